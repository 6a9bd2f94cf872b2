"""`claw up --demo`: a demo owner and a demo group with a small task graph.

Idempotent: the user and group are created once; each run gives the user a fresh random
password, which `claw up` prints. Everything is written through the services, so the demo
group's event log looks like any other group's."""

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction

from apps.groups.models import Group, Membership, Role
from apps.groups.services import group_create
from apps.tasks.models import Task
from apps.tasks.services import task_create

DEMO_USERNAME = "demo"
DEMO_GROUP_SLUG = "demo"
DEMO_GROUP_NAME = "Demo group"


@dataclass(frozen=True)
class Demo:
    username: str
    password: str
    group: Group


def _demo_tasks(*, group: Group, actor) -> None:
    collect = task_create(
        group=group,
        actor=actor,
        title="Collect the release notes",
        instructions="Gather the notes of the last three releases into one file.",
        priority=10,
    )
    summarise = task_create(
        group=group,
        actor=actor,
        title="Summarise the changes",
        instructions="Write a one-page summary of what changed and why.",
        depends_on=[collect.id],
    )
    task_create(
        group=group,
        actor=actor,
        title="Review the summary",
        instructions="A human reads the summary and approves or asks for changes.",
        depends_on=[summarise.id],
    )


def demo_ensure() -> Demo:
    password = secrets.token_urlsafe(12)
    with transaction.atomic():
        user, _ = get_user_model().objects.get_or_create(
            username=DEMO_USERNAME, defaults={"email": "demo@example.com"}
        )
        user.set_password(password)
        user.is_active = True
        user.save()
    group = Group.objects.filter(slug=DEMO_GROUP_SLUG).first()
    if group is None:
        group = group_create(user=user, name=DEMO_GROUP_NAME, slug=DEMO_GROUP_SLUG)
    elif not Membership.objects.filter(group=group, user=user).exists():
        # Seed data repairing itself: there is no owner to act for it, so no service call.
        Membership.objects.create(group=group, user=user, role=Role.OWNER)
    if not Task.objects.filter(group=group).exists():
        _demo_tasks(group=group, actor=user)
    return Demo(username=DEMO_USERNAME, password=password, group=group)
