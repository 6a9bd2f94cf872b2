"""Task readiness: a task is ready when every dependency succeeded and its start is not held
for approval; a failed or cancelled dependency blocks or cancels its dependents by their
dependency-failure policy, and a retried dependency lifts the block."""

import pytest

from apps.events.models import Event
from apps.groups.services import group_update_policies
from apps.tasks.models import Task
from apps.tasks.services import (
    attempt_accept,
    attempt_complete,
    attempt_fail,
    task_assign,
    task_cancel,
    task_create,
    task_retry,
)
from claw.errors import InvalidInput
from tests.conftest import make_agent


def new_task(personas, title="T", **kwargs):
    return task_create(group=personas.group, actor=personas.member, title=title, **kwargs)


def run(personas, task, *, succeed=True, agent=None):
    agent = agent or personas.agent
    attempt = task_assign(task_id=task.id, agent_id=agent.id)
    attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)
    if succeed:
        attempt_complete(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch, result={"ok": 1})
    else:
        attempt_fail(
            attempt_id=attempt.id, agent=agent, epoch=attempt.epoch, error="boom", retryable=False
        )
    return attempt


def statuses(*tasks) -> list[str]:
    return [Task.objects.get(id=task.id).status for task in tasks]


def events_of(task, kind):
    return list(Event.objects.filter(task_id=task.id, kind=kind).values_list("payload", flat=True))


def test_a_task_is_ready_once_all_its_dependencies_succeeded(personas):
    first, second = new_task(personas, "first"), new_task(personas, "second")
    last = new_task(personas, "last", depends_on=[first.id, second.id])
    assert statuses(last) == ["waiting"]

    run(personas, first)
    assert statuses(last) == ["waiting"]
    run(personas, second)
    assert statuses(last) == ["ready"]


def test_tasks_take_the_groups_policies_unless_they_set_their_own(personas):
    group_update_policies(
        actor=personas.owner,
        group=personas.group,
        dependency_failure_policy="cancel",
        default_checkpoint_policy="review_result",
    )
    personas.group.refresh_from_db()
    inherited = new_task(personas, "inherited")
    own = new_task(personas, "own", dependency_failure_policy="block", checkpoint_policy="none")
    assert (inherited.dependency_failure_policy, inherited.checkpoint_policy) == (
        "cancel",
        "review_result",
    )
    assert (own.dependency_failure_policy, own.checkpoint_policy) == ("block", "none")


@pytest.mark.parametrize(
    "kwargs", [{"dependency_failure_policy": "explode"}, {"checkpoint_policy": "sometimes"}]
)
def test_unknown_policies_are_refused(personas, kwargs):
    with pytest.raises(InvalidInput):
        new_task(personas, **kwargs)
    assert not Task.objects.exists()


def test_failed_dependency_blocks_dependents(personas):
    build = new_task(personas, "build")
    deploy = new_task(personas, "deploy", depends_on=[build.id])
    announce = new_task(personas, "announce", depends_on=[deploy.id])

    run(personas, build, succeed=False)

    assert statuses(build, deploy, announce) == ["failed", "blocked", "blocked"]
    # Each block says which dependency caused it.
    assert events_of(deploy, "task.blocked") == [{"status": "blocked", "dependency": build.id}]
    assert events_of(announce, "task.blocked") == [{"status": "blocked", "dependency": deploy.id}]


def test_a_cancelled_dependency_blocks_dependents_too(personas):
    build = new_task(personas, "build")
    deploy = new_task(personas, "deploy", depends_on=[build.id])
    task_cancel(actor=personas.member, task=build)
    assert statuses(deploy) == ["blocked"]
    assert events_of(deploy, "task.blocked") == [{"status": "blocked", "dependency": build.id}]


def test_a_retried_dependency_unblocks_and_its_success_makes_dependents_ready(personas):
    build = new_task(personas, "build")
    deploy = new_task(personas, "deploy", depends_on=[build.id])
    announce = new_task(personas, "announce", depends_on=[deploy.id])
    run(personas, build, succeed=False)

    task_retry(actor=personas.member, task=build)
    assert statuses(build, deploy, announce) == ["ready", "waiting", "waiting"]

    run(personas, build)
    assert statuses(deploy, announce) == ["ready", "waiting"]
    run(personas, deploy)
    assert statuses(announce) == ["ready"]


def test_cancel_policy_cascades(
    personas, broadcasts, django_capture_on_commit_callbacks, monkeypatch
):
    build = new_task(personas, "build")
    deploy = new_task(personas, "deploy", depends_on=[build.id], dependency_failure_policy="cancel")
    # A sub-task of deploy already running somewhere: it goes with its parent.
    helper = make_agent(personas.group, "helper")
    child = new_task(personas, "deploy part", parent_id=deploy.id)
    child_attempt = task_assign(task_id=child.id, agent_id=helper.id)
    # Further down: one dependent cancels too, one (default policy) is blocked.
    notify = new_task(
        personas, "notify", depends_on=[deploy.id], dependency_failure_policy="cancel"
    )
    report = new_task(personas, "report", depends_on=[child.id])

    from apps.tasks.tasks import match_group

    matched: list[int] = []
    monkeypatch.setattr(match_group, "delay", matched.append)
    with django_capture_on_commit_callbacks(execute=True):
        run(personas, build, succeed=False)

    assert personas.group.id in matched  # the helper got capacity back: match its group
    assert statuses(build, deploy, child, notify, report) == [
        "failed",
        "cancelled",
        "cancelled",
        "cancelled",
        "blocked",
    ]
    child_attempt.refresh_from_db()
    assert child_attempt.status == "cancelled"
    assert (
        f"agent.{helper.id}",
        {
            "type": "attempt.cancel",
            "attempt_id": child_attempt.id,
            "epoch": child_attempt.epoch,
            "task_id": child.id,
        },
    ) in broadcasts
    [cancelled] = events_of(deploy, "task.cancelled")
    assert cancelled["reason"] == f"dependency #{build.id} did not succeed"
    assert "parent was cancelled" in events_of(child, "task.cancelled")[0]["reason"]
    assert events_of(report, "task.blocked") == [{"status": "blocked", "dependency": child.id}]


def test_a_blocked_dependency_blocks_even_a_cancel_policy_dependent(personas):
    """Only a dependency that failed or was cancelled cancels; a blocked one may still be
    unblocked, so what depends on it waits blocked."""
    build = new_task(personas, "build")
    deploy = new_task(personas, "deploy", depends_on=[build.id])
    notify = new_task(
        personas, "notify", depends_on=[deploy.id], dependency_failure_policy="cancel"
    )

    run(personas, build, succeed=False)
    assert statuses(deploy, notify) == ["blocked", "blocked"]

    task_retry(actor=personas.member, task=build)
    assert statuses(deploy, notify) == ["waiting", "waiting"]


def test_a_dependency_that_fails_later_cancels_a_blocked_cancel_policy_task(personas):
    first, second = new_task(personas, "first"), new_task(personas, "second")
    last = new_task(
        personas, "last", depends_on=[first.id, second.id], dependency_failure_policy="cancel"
    )
    task_cancel(actor=personas.member, task=first)
    assert statuses(last) == ["cancelled"]
    # Already cancelled: the second failure changes nothing more.
    run(personas, second, succeed=False)
    assert statuses(last) == ["cancelled"]
