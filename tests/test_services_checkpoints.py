from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from apps.checkpoints.models import Checkpoint, CheckpointStatus, Decision
from apps.checkpoints.services import (
    checkpoint_decide,
    checkpoint_expire,
    checkpoint_mark_delivered,
    checkpoint_raise,
)
from apps.events.models import Event
from apps.groups.models import Membership, Role
from apps.tasks.services import attempt_accept, task_assign, task_cancel, task_create
from claw.errors import Forbidden, InvalidInput, InvalidTransition, NotFound
from tests.conftest import make_user


@pytest.fixture
def running(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Deploy")
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    return attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)


def raise_for(personas, attempt, **kwargs):
    return checkpoint_raise(
        group=personas.group,
        task=attempt.task,
        attempt=attempt,
        source="agent",
        title="Deploy to production?",
        options=["deploy", "wait"],
        **kwargs,
    )


def status_of(checkpoint) -> str:
    return Checkpoint.objects.values_list("status", flat=True).get(id=checkpoint.id)


def test_an_approval_resolves_the_checkpoint_and_reaches_the_agent(
    personas, running, broadcasts, django_capture_on_commit_callbacks
):
    checkpoint = raise_for(personas, running)
    with django_capture_on_commit_callbacks(execute=True):
        checkpoint_decide(
            actor=personas.approver, checkpoint=checkpoint, verdict="approve", note="go"
        )
    assert status_of(checkpoint) == CheckpointStatus.APPROVED
    assert (
        f"agent.{personas.agent.id}",
        {
            "type": "checkpoint.resolved",
            "checkpoint_id": checkpoint.id,
            "attempt_id": running.id,
            "status": "approved",
            "note": "go",
        },
    ) in broadcasts
    kinds = list(Event.objects.filter(kind__startswith="checkpoint").values_list("kind", flat=True))
    assert kinds == ["checkpoint.raised", "checkpoint.decision", "checkpoint.approved"]


@pytest.mark.parametrize(
    ("verdict", "status"),
    [("reject", "rejected"), ("request_changes", "changes_requested")],
)
def test_one_reject_or_change_request_resolves_at_once(personas, running, verdict, status):
    checkpoint = raise_for(personas, running, required_approvals=2)
    checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict=verdict, note="no")
    assert status_of(checkpoint) == status


def test_approvals_wait_for_the_quorum(personas, running):
    checkpoint = raise_for(personas, running, required_approvals=2)
    checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")
    assert status_of(checkpoint) == CheckpointStatus.PENDING
    checkpoint_decide(actor=personas.owner, checkpoint=checkpoint, verdict="approve")
    assert status_of(checkpoint) == CheckpointStatus.APPROVED


def test_deciding_twice_is_rejected(personas, running):
    checkpoint = raise_for(personas, running, required_approvals=2)
    checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")
    with pytest.raises(InvalidTransition) as exc:
        checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")
    assert exc.value.code == "already_decided"
    assert Decision.objects.count() == 1


def test_a_resolved_checkpoint_takes_no_more_decisions(personas, running):
    checkpoint = raise_for(personas, running)
    checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="reject")
    with pytest.raises(InvalidTransition) as exc:
        checkpoint_decide(actor=personas.owner, checkpoint=checkpoint, verdict="approve")
    assert exc.value.code == "already_resolved"
    assert status_of(checkpoint) == CheckpointStatus.REJECTED


def test_viewers_members_and_outsiders_cannot_decide(personas, running):
    checkpoint = raise_for(personas, running)
    for persona, error in (
        (personas.viewer, Forbidden),
        (personas.member, Forbidden),
        (personas.outsider, NotFound),
    ):
        with pytest.raises(error):
            checkpoint_decide(actor=persona, checkpoint=checkpoint, verdict="approve")
    assert not Decision.objects.exists()


def test_an_owner_only_checkpoint_refuses_approvers(personas, running):
    checkpoint = raise_for(personas, running, decider_role=Role.OWNER)
    with pytest.raises(Forbidden):
        checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")


def test_an_expired_checkpoint_refuses_decisions_and_expires_by_its_policy(personas, running):
    checkpoint = raise_for(personas, running, expires_at=timezone.now() + timedelta(minutes=5))
    with time_machine.travel(timezone.now() + timedelta(minutes=6)):
        with pytest.raises(InvalidTransition) as exc:
            checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")
        assert exc.value.code == "expired"
        assert checkpoint_expire(checkpoint_id=checkpoint.id) == CheckpointStatus.EXPIRED
        assert checkpoint_expire(checkpoint_id=checkpoint.id) is None
    assert status_of(checkpoint) == CheckpointStatus.EXPIRED


def test_expiry_can_escalate_to_owners(personas, running):
    checkpoint = raise_for(
        personas,
        running,
        expires_at=timezone.now() + timedelta(minutes=5),
        expiry_action="escalate",
    )
    with time_machine.travel(timezone.now() + timedelta(minutes=6)):
        assert checkpoint_expire(checkpoint_id=checkpoint.id) == "escalated"
        with pytest.raises(Forbidden):
            checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")
        checkpoint_decide(actor=personas.owner, checkpoint=checkpoint, verdict="approve")
    assert status_of(checkpoint) == CheckpointStatus.APPROVED


def test_a_pending_checkpoint_does_not_expire_early(personas, running):
    checkpoint = raise_for(personas, running, expires_at=timezone.now() + timedelta(minutes=5))
    assert checkpoint_expire(checkpoint_id=checkpoint.id) is None
    assert status_of(checkpoint) == CheckpointStatus.PENDING


@pytest.mark.parametrize(
    "kwargs",
    [
        {"title": ""},
        {"title": "x", "source": "oracle"},
        {"title": "x", "required_approvals": 0},
        {"title": "x", "decider_role": "viewer"},
        {"title": "x", "options": ["a"] * 11},
        {"title": "x", "expiry_action": "explode"},
    ],
)
def test_invalid_checkpoints_are_rejected(personas, kwargs):
    kwargs = {"source": "human", **kwargs}
    with pytest.raises(InvalidInput):
        checkpoint_raise(group=personas.group, **kwargs)
    assert not Checkpoint.objects.exists()


def test_cancelling_the_task_cancels_its_pending_checkpoints(personas, running):
    checkpoint = raise_for(personas, running)
    task_cancel(actor=personas.member, task=running.task)
    assert status_of(checkpoint) == CheckpointStatus.CANCELLED


def test_delivery_is_marked_once_and_only_after_resolution(personas, running):
    checkpoint = raise_for(personas, running)
    assert checkpoint_mark_delivered(checkpoint_id=checkpoint.id) is False
    checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")
    assert checkpoint_mark_delivered(checkpoint_id=checkpoint.id) is True
    assert checkpoint_mark_delivered(checkpoint_id=checkpoint.id) is False


def test_a_former_approver_cannot_decide(personas, running):
    checkpoint = raise_for(personas, running)
    leaver = make_user("leaver")
    Membership.objects.create(group=personas.group, user=leaver, role=Role.APPROVER)
    Membership.objects.filter(user=leaver).delete()
    with pytest.raises(NotFound):
        checkpoint_decide(actor=leaver, checkpoint=checkpoint, verdict="approve")


# --- a task out of attempts: retry, reassign, or give up ----------------------------------


@pytest.fixture
def exhausted(personas):
    from apps.tasks.services import attempt_accept, attempt_lose

    task = task_create(group=personas.group, actor=personas.member, title="Flaky", max_attempts=1)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)
    attempt_lose(attempt_id=attempt.id, reason="lease expired")
    checkpoint = Checkpoint.objects.get(task=task)
    assert (checkpoint.kind, checkpoint.options) == (
        "max_attempts",
        ["retry", "reassign", "cancel"],
    )
    return checkpoint


def test_approving_retry_puts_the_task_back_in_the_pool(personas, exhausted):
    checkpoint_decide(
        actor=personas.approver, checkpoint=exhausted, verdict="approve", option="retry"
    )
    exhausted.task.refresh_from_db()
    assert exhausted.task.status == "ready"


def test_approving_reassign_hands_the_task_to_the_chosen_agent(personas, exhausted):
    from tests.conftest import make_agent

    chosen = make_agent(personas.group, "chosen")
    checkpoint_decide(
        actor=personas.approver,
        checkpoint=exhausted,
        verdict="approve",
        option="reassign",
        assign_to=chosen.id,
    )
    attempt = exhausted.task.attempts.get(epoch=2)
    assert (attempt.agent_id, attempt.status) == (chosen.id, "offered")
    assert "reassigned by approver" in attempt.choice["reason"]


def test_reassigning_to_an_agent_that_cannot_take_it_changes_nothing(personas, exhausted):
    from tests.conftest import make_agent

    busy = make_agent(personas.group, "busy", toolkits={"vision": "1"})
    busy.status = "offline"
    busy.save()
    with pytest.raises(InvalidTransition):
        checkpoint_decide(
            actor=personas.approver,
            checkpoint=exhausted,
            verdict="approve",
            option="reassign",
            assign_to=busy.id,
        )
    assert status_of(exhausted) == CheckpointStatus.PENDING
    exhausted.task.refresh_from_db()
    assert exhausted.task.status == "failed"
    assert not Decision.objects.exists()


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"verdict": "approve"}, "option_required"),
        ({"verdict": "approve", "option": "explode"}, "option_required"),
        ({"verdict": "approve", "option": "reassign"}, "assign_to_required"),
        ({"verdict": "approve", "option": "retry", "assign_to": 1}, "assign_to_required"),
        ({"verdict": "reject", "option": "retry"}, "invalid"),
    ],
)
def test_options_are_validated(personas, exhausted, kwargs, code):
    with pytest.raises(InvalidInput) as exc:
        checkpoint_decide(actor=personas.approver, checkpoint=exhausted, **kwargs)
    assert exc.value.code == code
    assert status_of(exhausted) == CheckpointStatus.PENDING


def test_giving_up_leaves_the_task_failed(personas, exhausted):
    checkpoint_decide(
        actor=personas.approver, checkpoint=exhausted, verdict="approve", option="cancel"
    )
    exhausted.task.refresh_from_db()
    assert (exhausted.task.status, status_of(exhausted)) == ("failed", "approved")


def test_checkpoints_take_the_groups_defaults_unless_they_set_their_own(personas, running):
    from apps.groups.services import group_update_policies

    group_update_policies(
        actor=personas.owner,
        group=personas.group,
        checkpoint_required_approvals=3,
        checkpoint_decider_role="owner",
        checkpoint_expiry_s=600,
        checkpoint_expiry_action="escalate",
    )
    personas.group.refresh_from_db()
    inherited = raise_for(personas, running)
    own = raise_for(personas, running, required_approvals=1, decider_role="approver")

    assert (inherited.required_approvals, inherited.decider_role, inherited.expiry_action) == (
        3,
        "owner",
        "escalate",
    )
    assert 590 <= (inherited.expires_at - timezone.now()).total_seconds() <= 600
    assert (own.required_approvals, own.decider_role) == (1, "approver")
    raised = Event.objects.filter(kind="checkpoint.raised").order_by("seq").first()
    assert raised.payload["required_approvals"] == 3 and raised.payload["decider_role"] == "owner"


def test_the_sweep_expires_only_what_is_due(personas, running):
    from apps.checkpoints.services import checkpoints_sweep_expired

    soon = raise_for(personas, running, expires_at=timezone.now() + timedelta(minutes=5))
    later = raise_for(personas, running, expires_at=timezone.now() + timedelta(hours=5))
    never = raise_for(personas, running)
    with time_machine.travel(timezone.now() + timedelta(minutes=6)):
        assert checkpoints_sweep_expired() == 1
    assert [status_of(c) for c in (soon, later, never)] == ["expired", "pending", "pending"]
