import io

import pytest

from apps.devices.models import AgentStatus
from apps.events.models import Event
from apps.tasks.models import Artifact, Attempt, AttemptStatus, Task, TaskStatus
from apps.tasks.services import (
    artifact_create,
    attempt_accept,
    attempt_complete,
    attempt_decline,
    attempt_fail,
    attempt_lose,
    attempt_progress,
    task_assign,
    task_cancel,
    task_create,
    task_dependency_add,
    task_retry,
)
from claw.errors import Forbidden, InvalidInput, InvalidTransition, NotFound, StaleAttempt
from tests.conftest import make_agent


@pytest.fixture
def task(personas):
    return task_create(group=personas.group, actor=personas.member, title="Write the report")


def run(task, agent):
    attempt = task_assign(task_id=task.id, agent_id=agent.id)
    return attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)


def status_of(task) -> str:
    return Task.objects.values_list("status", flat=True).get(id=task.id)


# --- creation ----------------------------------------------------------------------------


def test_a_task_without_dependencies_is_ready(task):
    assert task.status == TaskStatus.READY
    assert task.root_id == task.id
    assert task.max_attempts == 3  # the group's default


def test_a_task_waits_for_unfinished_dependencies(personas, task):
    later = task_create(
        group=personas.group, actor=personas.member, title="Publish", depends_on=[task.id]
    )
    assert later.status == TaskStatus.WAITING


def test_subtasks_share_the_root_of_their_tree(personas, task):
    child = task_create(group=personas.group, actor=personas.member, title="a", parent_id=task.id)
    grandchild = task_create(
        group=personas.group, actor=personas.member, title="b", parent_id=child.id
    )
    assert grandchild.root_id == task.id


def test_an_agent_can_create_subtasks_in_its_own_group(personas, task):
    sub = task_create(group=personas.group, agent=personas.agent, title="Sub", parent_id=task.id)
    assert sub.created_by_agent == personas.agent
    with pytest.raises(NotFound):
        task_create(group=personas.group, agent=personas.other_agent, title="Intruder")


def test_viewers_and_outsiders_cannot_create_tasks(personas):
    with pytest.raises(Forbidden):
        task_create(group=personas.group, actor=personas.viewer, title="x")
    with pytest.raises(NotFound):
        task_create(group=personas.group, actor=personas.outsider, title="x")
    assert not Task.objects.exists()


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"title": ""}, "invalid"),
        ({"title": "x" * 201}, "invalid"),
        ({"title": "x", "priority": 101}, "invalid"),
        ({"title": "x", "max_attempts": 0}, "invalid"),
        ({"title": "x", "required_toolkits": ["teleport"]}, "unknown_toolkit"),
        ({"title": "x", "steps": [{"tool": "shell"}, {"tool": ""}]}, "invalid_steps"),
        ({"title": "x", "steps": [{"tool": "shell", "arg": 1}]}, "invalid_steps"),
        ({"title": "x", "depends_on": [999999]}, "unknown_dependency"),
    ],
)
def test_invalid_tasks_are_rejected_with_a_clear_code(personas, kwargs, code):
    with pytest.raises(InvalidInput) as exc:
        task_create(group=personas.group, actor=personas.member, **kwargs)
    assert exc.value.code == code
    assert not Task.objects.exists()
    assert not Event.objects.filter(kind="task.created").exists()


def test_explicit_steps_are_stored_normalized(personas):
    task = task_create(
        group=personas.group,
        actor=personas.member,
        title="Steps",
        steps=[{"tool": "shell.run", "args": {"cmd": "ls"}}, {"tool": "python"}],
        required_toolkits=["shell", "python", "shell"],
    )
    assert task.steps == [
        {"tool": "shell.run", "args": {"cmd": "ls"}},
        {"tool": "python", "args": {}},
    ]
    assert task.required_toolkits == ["python", "shell"]


def test_dependencies_in_another_group_are_rejected(personas):
    foreign = task_create(group=personas.other_group, actor=personas.outsider, title="Theirs")
    with pytest.raises(InvalidInput):
        task_create(group=personas.group, actor=personas.member, title="x", depends_on=[foreign.id])


def test_a_dependency_cycle_is_rejected_with_a_clear_error(personas):
    a = task_create(group=personas.group, actor=personas.member, title="a")
    b = task_create(group=personas.group, actor=personas.member, title="b", depends_on=[a.id])
    c = task_create(group=personas.group, actor=personas.member, title="c", depends_on=[b.id])
    with pytest.raises(InvalidInput) as exc:
        task_dependency_add(actor=personas.member, task=a, depends_on=c)
    assert exc.value.code == "dependency_cycle"
    assert "cycle" in exc.value.message
    with pytest.raises(InvalidInput):
        task_dependency_add(actor=personas.member, task=a, depends_on=a)
    assert status_of(a) == TaskStatus.READY


def test_adding_an_unfinished_dependency_makes_a_ready_task_wait(personas, task):
    other = task_create(group=personas.group, actor=personas.member, title="first")
    task_dependency_add(actor=personas.member, task=task, depends_on=other)
    assert status_of(task) == TaskStatus.WAITING


# --- the attempt lifecycle ---------------------------------------------------------------


def test_assign_accept_complete_walks_the_happy_path(personas, task):
    agent = personas.agent
    attempt = task_assign(task_id=task.id, agent_id=agent.id, choice={"reason": "only one"})
    assert (attempt.epoch, attempt.status) == (1, AttemptStatus.OFFERED)
    assert status_of(task) == TaskStatus.ASSIGNED
    assert attempt.device_id == agent.device_id
    attempt_accept(attempt_id=attempt.id, agent=agent, epoch=1)
    assert status_of(task) == TaskStatus.RUNNING
    attempt_complete(attempt_id=attempt.id, agent=agent, epoch=1, result={"pages": 3})
    task.refresh_from_db()
    agent.refresh_from_db()
    assert (task.status, task.result) == (TaskStatus.SUCCEEDED, {"pages": 3})
    assert agent.succeeded_count == 1
    assert agent.status == AgentStatus.ONLINE
    assert list(Event.objects.filter(task=task).order_by("seq").values_list("kind", flat=True)) == [
        "task.created",
        "task.assigned",
        "task.running",
        "task.succeeded",
    ]


def test_success_releases_dependents_when_all_their_dependencies_succeeded(personas):
    a = task_create(group=personas.group, actor=personas.member, title="a")
    b = task_create(group=personas.group, actor=personas.member, title="b")
    c = task_create(group=personas.group, actor=personas.member, title="c", depends_on=[a.id, b.id])
    agent = make_agent(personas.group, "beta", capacity=2)
    for dep in (a, b):
        attempt = run(dep, agent)
        attempt_complete(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch, result=None)
        expected = TaskStatus.READY if dep is b else TaskStatus.WAITING
        assert status_of(c) == expected


def test_an_agent_at_capacity_is_busy_and_gets_no_more_work(personas):
    agent = personas.agent  # capacity 1
    first = task_create(group=personas.group, actor=personas.member, title="1")
    second = task_create(group=personas.group, actor=personas.member, title="2")
    task_assign(task_id=first.id, agent_id=agent.id)
    agent.refresh_from_db()
    assert agent.status == AgentStatus.BUSY
    with pytest.raises(InvalidTransition) as exc:
        task_assign(task_id=second.id, agent_id=agent.id)
    assert exc.value.code == "agent_at_capacity"
    assert status_of(second) == TaskStatus.READY


def test_a_task_is_never_assigned_twice(personas, task):
    other = make_agent(personas.group, "beta")
    task_assign(task_id=task.id, agent_id=personas.agent.id)
    with pytest.raises(InvalidTransition) as exc:
        task_assign(task_id=task.id, agent_id=other.id)
    assert exc.value.code == "not_ready"
    assert Attempt.objects.filter(task=task).count() == 1


def test_an_agent_without_the_required_toolkits_cannot_be_assigned(personas):
    task = task_create(
        group=personas.group, actor=personas.member, title="Browse", required_toolkits=["browser"]
    )
    with pytest.raises(InvalidTransition) as exc:
        task_assign(task_id=task.id, agent_id=personas.agent.id)
    assert exc.value.code == "missing_toolkit"


def test_an_agent_of_another_group_cannot_be_assigned(personas, task):
    with pytest.raises(NotFound):
        task_assign(task_id=task.id, agent_id=personas.other_agent.id)


def test_a_draining_or_offline_agent_gets_no_work(personas, task):
    personas.agent.status = AgentStatus.DRAINING
    personas.agent.save()
    with pytest.raises(InvalidTransition):
        task_assign(task_id=task.id, agent_id=personas.agent.id)
    assert status_of(task) == TaskStatus.READY


def test_declining_returns_the_task_to_the_pool(personas, task):
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_decline(attempt_id=attempt.id, agent=personas.agent, epoch=1, reason="busy")
    attempt.refresh_from_db()
    assert attempt.status == AttemptStatus.DECLINED
    assert status_of(task) == TaskStatus.READY
    second = task_assign(task_id=task.id, agent_id=personas.agent.id)
    assert second.epoch == 2


def test_a_retryable_failure_returns_the_task_to_ready(personas, task):
    attempt = run(task, personas.agent)
    new_status = attempt_fail(
        attempt_id=attempt.id, agent=personas.agent, epoch=1, error="timeout", retryable=True
    )
    assert new_status == TaskStatus.READY
    personas.agent.refresh_from_db()
    assert personas.agent.failed_count == 1


def test_a_permanent_failure_fails_the_task_and_blocks_dependents(personas, task):
    dependent = task_create(
        group=personas.group, actor=personas.member, title="next", depends_on=[task.id]
    )
    transitive = task_create(
        group=personas.group, actor=personas.member, title="after", depends_on=[dependent.id]
    )
    attempt = run(task, personas.agent)
    attempt_fail(attempt_id=attempt.id, agent=personas.agent, epoch=1, error="no", retryable=False)
    assert status_of(task) == TaskStatus.FAILED
    assert status_of(dependent) == TaskStatus.BLOCKED
    assert status_of(transitive) == TaskStatus.BLOCKED


def test_the_task_fails_after_max_attempts(personas):
    task = task_create(group=personas.group, actor=personas.member, title="x", max_attempts=2)
    for expected in (TaskStatus.READY, TaskStatus.FAILED):
        attempt = run(task, personas.agent)
        outcome = attempt_lose(attempt_id=attempt.id, reason="lease expired")
        assert outcome == expected


def test_retry_gives_a_failed_task_fresh_attempts_and_unblocks_dependents(personas):
    task = task_create(group=personas.group, actor=personas.member, title="x", max_attempts=1)
    dependent = task_create(
        group=personas.group, actor=personas.member, title="y", depends_on=[task.id]
    )
    attempt = run(task, personas.agent)
    attempt_lose(attempt_id=attempt.id, reason="gone")
    assert status_of(task) == TaskStatus.FAILED
    assert status_of(dependent) == TaskStatus.BLOCKED
    task_retry(actor=personas.member, task=task)
    assert status_of(task) == TaskStatus.READY
    assert status_of(dependent) == TaskStatus.WAITING
    attempt = run(task, personas.agent)
    assert attempt.epoch == 2


def test_only_finished_tasks_can_be_retried(personas, task):
    with pytest.raises(InvalidTransition) as exc:
        task_retry(actor=personas.member, task=task)
    assert exc.value.code == "not_retryable"


def test_losing_an_attempt_is_idempotent(personas, task):
    attempt = run(task, personas.agent)
    assert attempt_lose(attempt_id=attempt.id, reason="lease") == TaskStatus.READY
    assert attempt_lose(attempt_id=attempt.id, reason="lease") is None
    assert Event.objects.filter(kind="attempt.lost").count() == 1


# --- fencing -----------------------------------------------------------------------------


def test_a_stale_holder_cannot_overwrite_the_new_owners_work(personas, task):
    old_agent = personas.agent
    new_agent = make_agent(personas.group, "beta")
    old = run(task, old_agent)
    attempt_lose(attempt_id=old.id, reason="lease expired")
    new = run(task, new_agent)
    events_before = Event.objects.count()
    with pytest.raises(StaleAttempt):
        attempt_complete(attempt_id=old.id, agent=old_agent, epoch=old.epoch, result="stale")
    with pytest.raises(StaleAttempt):
        attempt_progress(
            attempt_id=old.id, agent=old_agent, epoch=old.epoch, kind="log", payload={}
        )
    with pytest.raises(StaleAttempt):
        attempt_fail(
            attempt_id=old.id, agent=old_agent, epoch=old.epoch, error="x", retryable=False
        )
    assert Event.objects.count() == events_before
    task.refresh_from_db()
    assert (task.status, task.epoch, task.result) == (TaskStatus.RUNNING, 2, None)
    attempt_complete(attempt_id=new.id, agent=new_agent, epoch=new.epoch, result="fresh")
    task.refresh_from_db()
    assert task.result == "fresh"


def test_a_wrong_epoch_is_stale_even_for_the_right_agent(personas, task):
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    with pytest.raises(StaleAttempt):
        attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch + 1)
    assert status_of(task) == TaskStatus.ASSIGNED


def test_an_agent_cannot_act_on_another_agents_attempt(personas, task):
    other = make_agent(personas.group, "beta")
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    with pytest.raises(NotFound):
        attempt_accept(attempt_id=attempt.id, agent=other, epoch=attempt.epoch)


def test_completing_twice_is_rejected_and_changes_nothing(personas, task):
    attempt = run(task, personas.agent)
    attempt_complete(attempt_id=attempt.id, agent=personas.agent, epoch=1, result=1)
    with pytest.raises(StaleAttempt):
        attempt_complete(attempt_id=attempt.id, agent=personas.agent, epoch=1, result=2)
    task.refresh_from_db()
    assert task.result == 1


def test_progress_is_recorded_as_events_of_the_attempt(personas, task):
    attempt = run(task, personas.agent)
    seq = attempt_progress(
        attempt_id=attempt.id,
        agent=personas.agent,
        epoch=1,
        kind="tool_call",
        payload={"tool": "shell", "args": {"cmd": "ls"}},
    )
    event = Event.objects.get(group=personas.group, seq=seq)
    assert (event.kind, event.attempt_id, event.agent_id) == (
        "progress.tool_call",
        attempt.id,
        personas.agent.id,
    )
    with pytest.raises(InvalidInput):
        attempt_progress(attempt_id=attempt.id, agent=personas.agent, epoch=1, kind="x", payload={})


# --- cancellation ------------------------------------------------------------------------


def test_cancel_cascades_to_subtasks_and_tells_their_agents(
    personas, task, broadcasts, django_capture_on_commit_callbacks
):
    child = task_create(group=personas.group, actor=personas.member, title="c", parent_id=task.id)
    done = task_create(group=personas.group, actor=personas.member, title="d", parent_id=task.id)
    dependent = task_create(
        group=personas.group, actor=personas.member, title="after", depends_on=[task.id]
    )
    attempt = run(child, personas.agent)
    helper = make_agent(personas.group, "beta")
    finished = run(done, helper)
    attempt_complete(attempt_id=finished.id, agent=helper, epoch=1, result=None)
    with django_capture_on_commit_callbacks(execute=True):
        cancelled = task_cancel(actor=personas.member, task=task, reason="changed plans")
    assert sorted(cancelled) == sorted([task.id, child.id])
    assert status_of(done) == TaskStatus.SUCCEEDED
    assert status_of(dependent) == TaskStatus.BLOCKED
    attempt.refresh_from_db()
    assert attempt.status == AttemptStatus.CANCELLED
    assert (
        f"agent.{personas.agent.id}",
        {
            "type": "attempt.cancel",
            "attempt_id": attempt.id,
            "epoch": 1,
            "task_id": child.id,
        },
    ) in broadcasts
    with pytest.raises(StaleAttempt):
        attempt_complete(attempt_id=attempt.id, agent=personas.agent, epoch=1, result="late")


def test_a_finished_task_cannot_be_cancelled(personas, task):
    attempt = run(task, personas.agent)
    attempt_complete(attempt_id=attempt.id, agent=personas.agent, epoch=1, result=None)
    with pytest.raises(InvalidTransition) as exc:
        task_cancel(actor=personas.member, task=task)
    assert exc.value.code == "already_finished"


def test_viewers_cannot_cancel_or_retry(personas, task):
    with pytest.raises(Forbidden):
        task_cancel(actor=personas.viewer, task=task)
    with pytest.raises(Forbidden):
        task_retry(actor=personas.viewer, task=task)
    assert status_of(task) == TaskStatus.READY


# --- artifacts ---------------------------------------------------------------------------


def test_artifacts_are_versioned_by_name(personas, task, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    first = artifact_create(
        task=task,
        name="report.md",
        upload=io.BytesIO(b"# v1"),
        actor=personas.member,
        content_type="text/markdown",
        kind="document",
    )
    second = artifact_create(
        task=task, name="report.md", upload=io.BytesIO(b"# v2"), actor=personas.member
    )
    assert (first.version, second.version) == (1, 2)
    assert second.size == 4
    with second.file.open("rb") as f:
        assert f.read() == b"# v2"


def test_an_oversized_artifact_is_refused_and_nothing_is_stored(personas, task, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    settings.CLAW_ARTIFACT_MAX_BYTES = 10
    with pytest.raises(InvalidInput) as exc:
        artifact_create(
            task=task, name="big.bin", upload=io.BytesIO(b"x" * 11), actor=personas.member
        )
    assert exc.value.code == "too_large"
    assert not Artifact.objects.exists()
    assert not any(tmp_path.rglob("big.bin"))


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", ".."])
def test_artifact_names_cannot_escape(personas, task, name):
    with pytest.raises(InvalidInput):
        artifact_create(task=task, name=name, upload=io.BytesIO(b"x"), actor=personas.member)


def test_only_the_running_attempt_adds_artifacts(personas, task, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    attempt = run(task, personas.agent)
    artifact = artifact_create(
        task=task, name="out.csv", upload=io.BytesIO(b"a,b"), attempt=attempt
    )
    assert artifact.created_by_agent == personas.agent
    attempt_lose(attempt_id=attempt.id, reason="gone")
    attempt.refresh_from_db()
    with pytest.raises(StaleAttempt):
        artifact_create(task=task, name="out.csv", upload=io.BytesIO(b"late"), attempt=attempt)
    assert Artifact.objects.count() == 1
