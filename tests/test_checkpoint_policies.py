"""Checkpoint policies: approve before start, review each result, the group's defaults for
quorum, deciders and expiry, the approvals inbox, and what reaches the agent."""

import asyncio
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from apps.checkpoints.models import Checkpoint, Decision
from apps.checkpoints.selectors import (
    checkpoints_pending_count_for_user,
    checkpoints_pending_for_user,
)
from apps.checkpoints.services import (
    checkpoint_decide,
    checkpoint_raise,
    checkpoints_sweep_expired,
)
from apps.devices.selectors import assignment_frame, welcome_frame
from apps.events.models import Event
from apps.groups.models import Membership, Role
from apps.groups.services import group_update_policies
from apps.tasks.matching import tasks_match
from apps.tasks.models import Attempt, Task
from apps.tasks.services import (
    attempt_accept,
    attempt_complete,
    task_assign,
    task_cancel,
    task_create,
    task_retry,
)
from claw import protocol
from claw.device.runner import MAX_CHANGE_ROUNDS, AttemptRunner
from claw.device.toolkits import ShellToolkit
from claw.errors import Forbidden, InvalidInput, InvalidTransition, NotFound
from tests.conftest import make_agent, make_user


def new_task(personas, title="T", **kwargs):
    return task_create(group=personas.group, actor=personas.member, title=title, **kwargs)


def status_of(obj) -> str:
    return type(obj).objects.values_list("status", flat=True).get(id=obj.id)


def decide(persona, checkpoint, verdict="approve", **kwargs):
    return checkpoint_decide(actor=persona, checkpoint=checkpoint, verdict=verdict, **kwargs)


def policies(personas, **changes):
    group_update_policies(actor=personas.owner, group=personas.group, **changes)
    personas.group.refresh_from_db()


def start_checkpoint(task) -> Checkpoint:
    return Checkpoint.objects.get(task=task, kind="before_start", status="pending")


def run_to_review(personas, task, result=None, agent=None):
    agent = agent or personas.agent
    attempt = task_assign(task_id=task.id, agent_id=agent.id)
    attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)
    attempt_complete(
        attempt_id=attempt.id, agent=agent, epoch=attempt.epoch, result=result or {"v": 1}
    )
    return attempt


def review_checkpoint(task) -> Checkpoint:
    return Checkpoint.objects.get(task=task, kind="review", status="pending")


# --- before_start ------------------------------------------------------------------------


def test_before_start_task_waits_for_approval(personas):
    task = new_task(personas, "Send the newsletter", checkpoint_policy="before_start")

    checkpoint = start_checkpoint(task)
    assert status_of(task) == "waiting"
    assert (checkpoint.source, checkpoint.required_approvals, checkpoint.decider_role) == (
        "policy",
        1,
        "approver",
    )
    assert tasks_match(group_id=personas.group.id) == []  # held: not matchable

    decide(personas.approver, checkpoint, note="go")

    assert status_of(task) == "ready"
    [attempt_id] = tasks_match(group_id=personas.group.id)
    assert Attempt.objects.get(id=attempt_id).task_id == task.id
    assert Task.objects.get(id=task.id).start_approved_at is not None


def test_the_start_is_asked_only_once_the_dependencies_succeeded(personas):
    build = new_task(personas, "build")
    deploy = new_task(personas, "deploy", depends_on=[build.id], checkpoint_policy="before_start")
    assert not Checkpoint.objects.filter(task=deploy).exists()

    attempt = task_assign(task_id=build.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)
    attempt_complete(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch, result=1)

    assert status_of(deploy) == "waiting"
    decide(personas.approver, start_checkpoint(deploy))
    assert status_of(deploy) == "ready"


def test_the_groups_default_checkpoint_policy_holds_new_tasks(personas):
    policies(personas, default_checkpoint_policy="before_start")
    task = new_task(personas)
    assert (task.checkpoint_policy, status_of(task)) == ("before_start", "waiting")
    assert start_checkpoint(task)


def test_a_rejected_start_cancels_the_task_and_a_retry_asks_again(personas):
    task = new_task(personas, checkpoint_policy="before_start")
    dependent = new_task(personas, "after", depends_on=[task.id])

    decide(personas.approver, start_checkpoint(task), "reject", note="not now")

    assert (status_of(task), status_of(dependent)) == ("cancelled", "blocked")
    [cancelled] = Event.objects.filter(task=task, kind="task.cancelled")
    assert "start rejected" in cancelled.payload["reason"]

    task_retry(actor=personas.member, task=task)
    assert status_of(task) == "waiting"
    assert start_checkpoint(task)


def test_a_start_is_approved_or_rejected_not_changed(personas):
    task = new_task(personas, checkpoint_policy="before_start")
    with pytest.raises(InvalidInput) as exc:
        decide(personas.approver, start_checkpoint(task), "request_changes", note="hm")
    assert exc.value.code == "verdict_not_allowed"
    assert not Decision.objects.exists()


def test_a_before_start_checkpoint_raised_by_a_human_holds_a_ready_task(personas):
    task = new_task(personas)
    checkpoint = checkpoint_raise(
        group=personas.group, task=task, source="human", kind="before_start", title="Wait"
    )
    assert status_of(task) == "waiting"
    decide(personas.approver, checkpoint)
    assert status_of(task) == "ready"


# --- review_result -----------------------------------------------------------------------


def test_a_reviewed_result_counts_only_once_approved(personas, broadcasts):
    task = new_task(personas, "Draft", checkpoint_policy="review_result")
    dependent = new_task(personas, "Publish", depends_on=[task.id])
    attempt = run_to_review(personas, task, {"text": "draft 1"})

    task.refresh_from_db()
    checkpoint = review_checkpoint(task)
    assert (task.status, task.result, status_of(attempt)) == ("review", None, "succeeded")
    assert status_of(dependent) == "waiting"
    assert (checkpoint.source, checkpoint.attempt_id) == ("policy", attempt.id)
    assert "draft 1" in checkpoint.details

    decide(personas.approver, checkpoint)

    task.refresh_from_db()
    assert (task.status, task.result) == ("succeeded", {"text": "draft 1"})
    assert status_of(dependent) == "ready"
    # Nobody waits for a policy checkpoint's outcome: nothing is pushed to the agent and
    # nothing is replayed on its next connection.
    assert not [m for _, m in broadcasts if m["type"] == "checkpoint.resolved"]
    welcome = welcome_frame(
        agent_id=personas.agent.id,
        re="h",
        version=1,
        limits=protocol.Limits(max_frame_bytes=1, rate_per_s=1, burst=1),
    )
    assert welcome.decisions == []


def test_rejected_review_fails_the_attempt(personas):
    task = new_task(personas, "Draft", checkpoint_policy="review_result", max_attempts=3)
    dependent = new_task(personas, "Publish", depends_on=[task.id])
    attempt = run_to_review(personas, task)

    decide(personas.approver, review_checkpoint(task), "reject", note="wrong numbers")

    attempt.refresh_from_db()
    assert (attempt.status, attempt.failure_reason) == (
        "rejected",
        "rejected at review: wrong numbers",
    )
    # Rejected means failed, even with attempts left; asking for changes is the way to
    # another attempt.
    assert (status_of(task), status_of(dependent)) == ("failed", "blocked")
    assert Event.objects.filter(task=task, kind="attempt.rejected").exists()


def test_request_changes_sends_the_task_back_to_the_same_agent_with_the_note(personas):
    task = new_task(personas, "Draft", checkpoint_policy="review_result")
    first = run_to_review(personas, task)

    decide(personas.approver, review_checkpoint(task), "request_changes", note="Use the 2026 data")

    task.refresh_from_db()
    assert (status_of(first), task.status, task.feedback) == (
        "rejected",
        "assigned",
        "Use the 2026 data",
    )
    second = Attempt.objects.get(task=task, epoch=2)
    assert (second.agent_id, second.status) == (personas.agent.id, "offered")
    assert "changes requested" in second.choice["reason"]

    # The second result is approved: the feedback has done its job.
    attempt_accept(attempt_id=second.id, agent=personas.agent, epoch=2)
    attempt_complete(attempt_id=second.id, agent=personas.agent, epoch=2, result={"v": 2})
    decide(personas.approver, review_checkpoint(task))
    task.refresh_from_db()
    assert (task.status, task.result, task.feedback) == ("succeeded", {"v": 2}, "")


def test_request_changes_goes_to_the_matcher_when_that_agent_cannot_take_it(personas):
    task = new_task(personas, "Draft", checkpoint_policy="review_result")
    run_to_review(personas, task)
    personas.agent.status = "offline"
    personas.agent.save(update_fields=["status"])
    other = make_agent(personas.group, "other")

    decide(personas.approver, review_checkpoint(task), "request_changes", note="again")

    assert status_of(task) == "ready"
    [attempt_id] = tasks_match(group_id=personas.group.id)
    assert Attempt.objects.get(id=attempt_id).agent_id == other.id


def test_request_changes_reaches_the_agent_with_the_note(personas):
    task = new_task(personas, "Draft", checkpoint_policy="review_result")
    run_to_review(personas, task)
    decide(personas.approver, review_checkpoint(task), "request_changes", note="Shorter")

    frame = assignment_frame(attempt_id=Attempt.objects.get(task=task, epoch=2).id)

    assert frame.task.feedback == "Shorter"
    assert '"feedback":"Shorter"' in frame.model_dump_json()


def test_an_agents_request_changes_reaches_it_with_the_note(
    personas, broadcasts, django_capture_on_commit_callbacks
):
    task = new_task(personas)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt = attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)
    checkpoint = checkpoint_raise(
        group=personas.group, task=task, attempt=attempt, source="agent", title="Plan OK?"
    )

    with django_capture_on_commit_callbacks(execute=True):
        decide(personas.approver, checkpoint, "request_changes", note="Split step 2")

    assert (
        f"agent.{personas.agent.id}",
        {
            "type": "checkpoint.resolved",
            "checkpoint_id": checkpoint.id,
            "attempt_id": attempt.id,
            "status": "changes_requested",
            "note": "Split step 2",
        },
    ) in broadcasts
    # And again on reconnect until the agent confirms it.
    welcome = welcome_frame(
        agent_id=personas.agent.id,
        re="h",
        version=1,
        limits=protocol.Limits(max_frame_bytes=1, rate_per_s=1, burst=1),
    )
    [decision] = welcome.decisions
    assert (decision.status, decision.note) == ("changes_requested", "Split step 2")
    assert status_of(task) == "running"  # the agent goes on with the note


def test_the_assignment_frame_omits_feedback_unless_there_is_some():
    spec = {
        "id": 1,
        "title": "t",
        "instructions": "",
        "steps": [],
        "required_toolkits": [],
        "parent_id": None,
        "root_id": None,
    }
    plain = protocol.Assignment(
        attempt_id=1, epoch=1, status="offered", deadline="x", task=protocol.TaskSpec(**spec)
    )
    assert "feedback" not in plain.model_dump_json()
    noted = plain.model_copy(update={"task": protocol.TaskSpec(**spec, feedback="more")})
    parsed = protocol.SERVER_FRAMES.validate_json(noted.model_dump_json())
    assert parsed.task.feedback == "more"


# --- the runtime -------------------------------------------------------------------------


class Session:
    """A server that accepts every frame and answers checkpoints from a script."""

    def __init__(self, decisions):
        self.frames: list[tuple[str, dict]] = []
        self.decisions = list(decisions)
        self.confirmed: list[int] = []

    async def request(self, model, **fields):
        kind = model.model_fields["type"].annotation.__args__[0]
        protocol.parse_client_frame(model(type=kind, id="x", **fields).model_dump_json())
        self.frames.append((kind, fields))
        if kind == "checkpoint_request":
            return {"checkpoint_id": 40 + sum(k == kind for k, _ in self.frames)}
        return {}

    async def wait_decision(self, checkpoint_id):
        status, note = self.decisions.pop(0)
        return protocol.Decision(
            checkpoint_id=checkpoint_id, attempt_id=5, status=status, note=note
        )

    async def confirm_decision(self, checkpoint_id):
        self.confirmed.append(checkpoint_id)


def runner(session, tmp_path, steps, feedback=None):
    task = protocol.TaskSpec(
        id=9,
        title="t",
        instructions="",
        steps=steps,
        required_toolkits=[],
        parent_id=None,
        root_id=None,
        feedback=feedback,
    )
    assignment = protocol.Assignment(
        attempt_id=5, epoch=2, status="offered", deadline="2030-01-01T00:00:00Z", task=task
    )
    return AttemptRunner(
        assignment, session=session, toolkits={"shell": ShellToolkit()}, workdir=tmp_path
    )


CHECK_THEN_ECHO = [
    {"tool": "checkpoint", "args": {"title": "Go?", "details": "the plan"}},
    {"tool": "shell", "args": {"cmd": "echo done"}},
]


def test_the_runtime_logs_requested_changes_and_asks_again(tmp_path):
    session = Session([("changes_requested", "Split step 2"), ("approved", "")])
    attempt = runner(session, tmp_path, CHECK_THEN_ECHO)

    assert asyncio.run(attempt.run()) == "succeeded"

    kinds = [kind for kind, _ in session.frames]
    assert kinds == [
        "accept",
        "checkpoint_request",
        "progress",  # the note, as new input
        "checkpoint_request",  # the checkpoint step again
        "progress",
        "progress",
        "complete",
    ]
    log = session.frames[2][1]
    assert (log["kind"], log["data"]["changes_requested"], log["data"]["round"]) == (
        "log",
        "Split step 2",
        1,
    )
    assert "Split step 2" in session.frames[3][1]["details"]
    assert session.confirmed == [41, 42]
    assert attempt.feedback == ["Split step 2"]


def test_the_runtime_gives_up_after_repeated_change_requests(tmp_path):
    session = Session([("changes_requested", f"no {n}") for n in range(MAX_CHANGE_ROUNDS + 1)])
    assert asyncio.run(runner(session, tmp_path, CHECK_THEN_ECHO).run()) == "failed"
    kind, fail = session.frames[-1]
    assert kind == "fail" and fail["retryable"] is False
    assert f"changes requested: no {MAX_CHANGE_ROUNDS}" in fail["error"]


def test_the_runtime_surfaces_a_tasks_feedback(tmp_path):
    session = Session([])
    attempt = runner(
        session, tmp_path, [{"tool": "shell", "args": {"cmd": "true"}}], feedback="Shorter"
    )
    assert asyncio.run(attempt.run()) == "succeeded"
    assert session.frames[1] == (
        "progress",
        {"attempt_id": 5, "epoch": 2, "seq": 1, "kind": "log", "data": {"feedback": "Shorter"}},
    )
    assert session.frames[-1][1]["result"]["feedback"] == "Shorter"
    assert attempt.feedback == ["Shorter"]


# --- who decides, quorum, expiry ---------------------------------------------------------


def test_viewer_cannot_decide(personas):
    task = new_task(personas, checkpoint_policy="before_start")
    checkpoint = start_checkpoint(task)
    for persona, error in (
        (personas.viewer, Forbidden),
        (personas.member, Forbidden),
        (personas.outsider, NotFound),
    ):
        with pytest.raises(error):
            decide(persona, checkpoint)
    assert status_of(checkpoint) == "pending" and status_of(task) == "waiting"


def test_quorum_needs_two_approvals(personas):
    policies(personas, checkpoint_required_approvals=2)
    task = new_task(personas, checkpoint_policy="before_start")
    checkpoint = start_checkpoint(task)
    assert checkpoint.required_approvals == 2

    decide(personas.approver, checkpoint)
    assert (status_of(checkpoint), status_of(task)) == ("pending", "waiting")
    with pytest.raises(InvalidTransition) as exc:
        decide(personas.approver, checkpoint)
    assert exc.value.code == "already_decided"

    decide(personas.owner, checkpoint)
    assert (status_of(checkpoint), status_of(task)) == ("approved", "ready")
    with pytest.raises(InvalidTransition) as exc:
        decide(personas.owner, checkpoint, "reject")
    assert exc.value.code == "already_resolved"


def test_an_owners_only_group_policy_refuses_approvers(personas):
    policies(personas, checkpoint_decider_role="owner")
    task = new_task(personas, checkpoint_policy="review_result")
    run_to_review(personas, task)
    checkpoint = review_checkpoint(task)
    with pytest.raises(Forbidden):
        decide(personas.approver, checkpoint)
    decide(personas.owner, checkpoint)
    assert status_of(task) == "succeeded"


def test_expired_checkpoint_escalates_to_owners(personas):
    policies(personas, checkpoint_expiry_s=3600, checkpoint_expiry_action="escalate")
    task = new_task(personas, checkpoint_policy="before_start")
    checkpoint = start_checkpoint(task)
    assert checkpoint.expires_at is not None

    with time_machine.travel(timezone.now() + timedelta(hours=2)):
        with pytest.raises(InvalidTransition) as exc:
            decide(personas.approver, checkpoint)
        assert exc.value.code == "expired"

        assert checkpoints_sweep_expired() == 1
        assert checkpoints_sweep_expired() == 0

        checkpoint.refresh_from_db()
        assert (checkpoint.status, checkpoint.decider_role, checkpoint.expires_at) == (
            "pending",
            "owner",
            None,
        )
        with pytest.raises(Forbidden):
            decide(personas.approver, checkpoint)
        decide(personas.owner, checkpoint)
    assert status_of(task) == "ready"
    assert Event.objects.filter(kind="checkpoint.escalated", task=task).exists()


def test_an_expired_review_is_rejected(personas):
    policies(personas, checkpoint_expiry_s=60)  # expiry action: reject (the default)
    task = new_task(personas, checkpoint_policy="review_result")
    attempt = run_to_review(personas, task)
    checkpoint = review_checkpoint(task)

    with time_machine.travel(timezone.now() + timedelta(minutes=2)):
        assert checkpoints_sweep_expired() == 1

    assert (status_of(checkpoint), status_of(attempt), status_of(task)) == (
        "expired",
        "rejected",
        "failed",
    )


def test_an_expired_start_cancels_the_task(personas):
    policies(personas, checkpoint_expiry_s=60)
    task = new_task(personas, checkpoint_policy="before_start")
    with time_machine.travel(timezone.now() + timedelta(minutes=2)):
        assert checkpoints_sweep_expired() == 1
    assert status_of(task) == "cancelled"


def test_every_decision_is_in_the_event_log(personas):
    policies(personas, checkpoint_required_approvals=2)
    task = new_task(personas, checkpoint_policy="review_result")
    run_to_review(personas, task)
    checkpoint = review_checkpoint(task)
    decide(personas.approver, checkpoint, note="fine by me")
    decide(personas.owner, checkpoint, "request_changes", note="one more pass")

    decisions = Event.objects.filter(kind="checkpoint.decision").order_by("seq")
    assert [(e.actor_id, e.payload["verdict"], e.payload["note"]) for e in decisions] == [
        (personas.approver.id, "approve", "fine by me"),
        (personas.owner.id, "request_changes", "one more pass"),
    ]
    kinds = list(
        Event.objects.filter(task=task, seq__gt=decisions[0].seq)
        .order_by("seq")
        .values_list("kind", flat=True)
    )
    assert kinds[:4] == [
        "checkpoint.decision",
        "checkpoint.changes_requested",
        "attempt.changes_requested",
        "task.assigned",
    ]


def test_a_cancelled_task_takes_its_policy_checkpoints_with_it(personas):
    task = new_task(personas, checkpoint_policy="review_result")
    run_to_review(personas, task)
    checkpoint = review_checkpoint(task)
    task_cancel(actor=personas.member, task=task)
    assert (status_of(task), status_of(checkpoint)) == ("cancelled", "cancelled")
    with pytest.raises(InvalidTransition):
        decide(personas.approver, checkpoint)


# --- the approvals inbox -----------------------------------------------------------------


def test_the_inbox_lists_what_each_person_may_decide(personas):
    anyone = checkpoint_raise(group=personas.group, title="Anyone", source="human")
    owners = checkpoint_raise(
        group=personas.group, title="Owners", source="human", decider_role="owner"
    )
    expired = checkpoint_raise(
        group=personas.group,
        title="Late",
        source="human",
        expires_at=timezone.now() + timedelta(minutes=1),
    )
    elsewhere = checkpoint_raise(group=personas.other_group, title="Theirs", source="human")
    Membership.objects.create(group=personas.other_group, user=personas.owner, role=Role.VIEWER)
    both = make_user("both")
    Membership.objects.create(group=personas.group, user=both, role=Role.APPROVER)
    Membership.objects.create(group=personas.other_group, user=both, role=Role.OWNER)

    def inbox(user):
        return [c.id for c in checkpoints_pending_for_user(user=user)]

    with time_machine.travel(timezone.now() + timedelta(minutes=2)):
        assert inbox(personas.owner) == [anyone.id, owners.id]
        assert inbox(personas.approver) == [anyone.id]
        assert inbox(both) == [anyone.id, elsewhere.id]
        assert inbox(personas.member) == inbox(personas.viewer) == []
        assert inbox(personas.outsider) == [elsewhere.id]
        assert checkpoints_pending_count_for_user(user=personas.owner) == 2
        assert expired.id not in inbox(personas.owner)


def test_the_inbox_drops_what_you_already_decided(personas, django_assert_max_num_queries):
    checkpoint = checkpoint_raise(
        group=personas.group, title="Two please", source="human", required_approvals=2
    )
    decide(personas.approver, checkpoint)
    assert checkpoints_pending_count_for_user(user=personas.approver) == 0
    with django_assert_max_num_queries(1):
        assert checkpoints_pending_count_for_user(user=personas.owner) == 1
    with django_assert_max_num_queries(1):
        [shown] = checkpoints_pending_for_user(user=personas.owner)
        assert (shown.group.slug, shown.task) == ("research", None)
