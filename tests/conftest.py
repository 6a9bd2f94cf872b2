from types import SimpleNamespace

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache

from apps.devices.models import Agent, AgentStatus, Device
from apps.groups.models import Group, Membership, Role
from claw.tokens import new_token, token_hash


def pytest_report_header(config):
    skips = settings.SERVICE_SKIPS
    db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    layer = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]
    lines = [f"claw: database={db} channel_layer={layer} broker={settings.CELERY_BROKER_URL}"]
    lines += [f"claw: skipping {name} tests: {why}" for name, why in skips.items()]
    return lines


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name, reason in settings.SERVICE_SKIPS.items():
            if item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(reason=reason))


def make_user(username: str):
    return get_user_model().objects.create_user(username=username, password="pw-" + username)


def make_agent(group: Group, name: str, *, toolkits=None, capacity: int = 1, device=None):
    if device is None:
        raw = new_token("clawd")
        device = Device.objects.create(
            group=group,
            name=f"{name}-device",
            kind="laptop",
            token_hash=token_hash(raw),
            token_prefix=raw[:12],
            paired_at="2026-01-01T00:00:00Z",
        )
        device.raw_token = raw
    return Agent.objects.create(
        group=group,
        device=device,
        name=name,
        toolkits=toolkits or {"shell": "1", "python": "3"},
        capacity=capacity,
        status=AgentStatus.ONLINE,
    )


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def personas(db):
    """The suite's cast: owner, approver, member, viewer and outsider humans; a group with
    one online agent; another group with its own agent."""
    group = Group.objects.create(name="Research", slug="research")
    other_group = Group.objects.create(name="Elsewhere", slug="elsewhere")
    people = {}
    for role in (Role.OWNER, Role.APPROVER, Role.MEMBER, Role.VIEWER):
        people[role.value] = make_user(role.value)
        Membership.objects.create(group=group, user=people[role.value], role=role)
    outsider = make_user("outsider")
    Membership.objects.create(group=other_group, user=outsider, role=Role.OWNER)
    return SimpleNamespace(
        group=group,
        other_group=other_group,
        owner=people["owner"],
        approver=people["approver"],
        member=people["member"],
        viewer=people["viewer"],
        outsider=outsider,
        agent=make_agent(group, "alpha"),
        other_agent=make_agent(other_group, "stranger"),
    )


@pytest.fixture
def broadcasts(monkeypatch):
    """Every channel-layer message services send, as (channel_group, message) pairs."""
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        "apps.events.broadcast.send_now", lambda group, message: sent.append((group, message))
    )
    monkeypatch.setattr("apps.events.broadcast.send_many_now", sent.extend)
    return sent
