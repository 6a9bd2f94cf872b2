from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.checkpoints.models import (
    Checkpoint,
    CheckpointKind,
    CheckpointSource,
    CheckpointStatus,
    Decision,
    ExpiryAction,
    Verdict,
)
from apps.events.broadcast import agent_channel, broadcast_on_commit
from apps.events.services import event_append
from apps.groups.models import Group, Role
from apps.groups.selectors import require_role
from apps.tasks.models import Attempt, Task
from claw.errors import InvalidInput, InvalidTransition

VERDICT_OUTCOME = {
    Verdict.APPROVE: CheckpointStatus.APPROVED,
    Verdict.REJECT: CheckpointStatus.REJECTED,
    Verdict.REQUEST_CHANGES: CheckpointStatus.CHANGES_REQUESTED,
}


def checkpoint_raise(
    *,
    group: Group,
    title: str,
    source: str,
    kind: str = CheckpointKind.REQUEST,
    details: str = "",
    options: list[str] | None = None,
    task: Task | None = None,
    attempt: Attempt | None = None,
    required_approvals: int = 1,
    decider_role: str = Role.APPROVER,
    expires_at: datetime | None = None,
    expiry_action: str = ExpiryAction.REJECT,
) -> Checkpoint:
    title = title.strip()
    if not title or len(title) > 200:
        raise InvalidInput("A checkpoint needs a title of 1 to 200 characters.")
    if source not in CheckpointSource.values:
        raise InvalidInput(f"source must be one of {', '.join(CheckpointSource.values)}.")
    if kind not in CheckpointKind.values:
        raise InvalidInput(f"kind must be one of {', '.join(CheckpointKind.values)}.")
    if not 1 <= required_approvals <= 20:
        raise InvalidInput("required_approvals must be from 1 to 20.")
    if decider_role not in (Role.APPROVER, Role.OWNER):
        raise InvalidInput("decider_role must be approver or owner.")
    if expiry_action not in ExpiryAction.values:
        raise InvalidInput(f"expiry_action must be one of {', '.join(ExpiryAction.values)}.")
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future.")
    options = options or []
    if len(options) > 10 or any(not isinstance(o, str) or len(o) > 100 for o in options):
        raise InvalidInput("options: at most 10 strings of at most 100 characters.")
    if task is not None and task.group_id != group.id:
        raise InvalidInput("The task is not in this group.")
    if attempt is not None and (task is None or attempt.task_id != task.id):
        raise InvalidInput("The attempt does not belong to the task.")
    with transaction.atomic():
        checkpoint = Checkpoint.objects.create(
            group=group,
            task=task,
            attempt=attempt,
            source=source,
            kind=kind,
            title=title,
            details=details,
            options=options,
            required_approvals=required_approvals,
            decider_role=decider_role,
            expires_at=expires_at,
            expiry_action=expiry_action,
        )
        event_append(
            group_id=group.id,
            kind="checkpoint.raised",
            task_id=task.id if task else None,
            attempt_id=attempt.id if attempt else None,
            agent_id=attempt.agent_id if attempt else None,
            payload={
                "checkpoint_id": checkpoint.id,
                "title": title,
                "source": source,
                "kind": kind,
            },
        )
    return checkpoint


def _resolve(checkpoint: Checkpoint, status: str, *, note: str = "", actor_id: int | None) -> None:
    updated = Checkpoint.objects.filter(id=checkpoint.id, status=CheckpointStatus.PENDING).update(
        status=status, resolved_at=timezone.now()
    )
    if updated != 1:
        raise InvalidTransition("This checkpoint was already resolved.", code="already_resolved")
    event_append(
        group_id=checkpoint.group_id,
        kind=f"checkpoint.{status}",
        task_id=checkpoint.task_id,
        attempt_id=checkpoint.attempt_id,
        actor_id=actor_id,
        payload={"checkpoint_id": checkpoint.id, "status": status, "note": note},
    )
    if checkpoint.attempt_id:
        agent_id = Attempt.objects.filter(id=checkpoint.attempt_id).values_list(
            "agent_id", flat=True
        )[0]
        broadcast_on_commit(
            agent_channel(agent_id),
            {
                "type": "checkpoint.resolved",
                "checkpoint_id": checkpoint.id,
                "attempt_id": checkpoint.attempt_id,
                "status": status,
                "note": note,
            },
        )


def checkpoint_decide(
    *,
    actor: AbstractBaseUser,
    checkpoint: Checkpoint,
    verdict: str,
    note: str = "",
    option: str = "",
    assign_to: int | None = None,
) -> Decision:
    """Record one person's decision. A reject or request-changes resolves at once; approvals
    resolve when the quorum is reached. Approving a checkpoint that offers options names
    one; the resolution then acts on it (see _act_on_resolution)."""
    if verdict not in Verdict.values:
        raise InvalidInput(f"verdict must be one of {', '.join(Verdict.values)}.")
    if len(note) > 5000:
        raise InvalidInput("A note is at most 5000 characters.")
    with transaction.atomic():
        current = Checkpoint.objects.select_for_update().get(id=checkpoint.id)
        # The role is checked against the locked row: an escalation may have raised it.
        require_role(user=actor, group_id=current.group_id, role=current.decider_role)
        if current.status != CheckpointStatus.PENDING:
            raise InvalidTransition(
                f"This checkpoint is already {current.status}.", code="already_resolved"
            )
        if current.expires_at is not None and current.expires_at <= timezone.now():
            raise InvalidTransition("This checkpoint has expired.", code="expired")
        _check_option(current, verdict=verdict, option=option, assign_to=assign_to)
        try:
            with transaction.atomic():
                decision = Decision.objects.create(
                    checkpoint=current, user=actor, verdict=verdict, option=option, note=note
                )
        except IntegrityError:
            raise InvalidTransition(
                "You already decided on this checkpoint.", code="already_decided"
            ) from None
        event_append(
            group_id=current.group_id,
            kind="checkpoint.decision",
            task_id=current.task_id,
            attempt_id=current.attempt_id,
            actor_id=actor.pk,
            payload={
                "checkpoint_id": current.id,
                "verdict": verdict,
                "option": option,
                "note": note,
            },
        )
        approvals = current.decisions.filter(verdict=Verdict.APPROVE).count()
        if verdict != Verdict.APPROVE or approvals >= current.required_approvals:
            _resolve(current, VERDICT_OUTCOME[verdict], note=note, actor_id=actor.pk)
            if verdict == Verdict.APPROVE:
                _act_on_resolution(current, option=option, assign_to=assign_to, actor=actor)
    return decision


def _check_option(checkpoint: Checkpoint, *, verdict: str, option: str, assign_to) -> None:
    if verdict != Verdict.APPROVE or not checkpoint.options:
        if option or assign_to is not None:
            raise InvalidInput("Only an approval of a checkpoint with options names an option.")
        return
    # Options are a choice to make where the outcome acts on it (a task out of attempts);
    # elsewhere they are suggestions, and naming one is optional.
    required = checkpoint.kind == CheckpointKind.MAX_ATTEMPTS
    if (option or required) and option not in checkpoint.options:
        raise InvalidInput(
            f"Approving this checkpoint names one of: {', '.join(checkpoint.options)}.",
            code="option_required",
        )
    if checkpoint.kind == CheckpointKind.MAX_ATTEMPTS and (option == "reassign") != (
        assign_to is not None
    ):
        raise InvalidInput(
            "reassign needs assign_to (the agent to run the task), and only reassign takes it.",
            code="assign_to_required",
        )


def _act_on_resolution(
    checkpoint: Checkpoint, *, option: str, assign_to: int | None, actor: AbstractBaseUser
) -> None:
    """What an approval does beyond resolving: for a task out of attempts, retry it, or
    retry it on the chosen agent at once (that agent must be able to take it, or the whole
    decision is refused); "cancel" leaves the task failed. Other kinds have no server-side
    reaction (the waiting agent gets the decision)."""
    if checkpoint.kind != CheckpointKind.MAX_ATTEMPTS or option not in {"retry", "reassign"}:
        return
    from apps.tasks.services import task_assign, task_retry

    task = task_retry(actor=actor, task=checkpoint.task)
    if option == "reassign":
        task_assign(
            task_id=task.id,
            agent_id=assign_to,
            choice={"reason": f"reassigned by {actor.get_username()} at checkpoint"},
        )


def checkpoint_expire(*, checkpoint_id: int) -> str | None:
    """Apply a pending checkpoint's expiry action once it is due. Idempotent."""
    with transaction.atomic():
        checkpoint = (
            Checkpoint.objects.select_for_update()
            .filter(
                id=checkpoint_id, status=CheckpointStatus.PENDING, expires_at__lte=timezone.now()
            )
            .first()
        )
        if checkpoint is None:
            return None
        if (
            checkpoint.expiry_action == ExpiryAction.ESCALATE
            and checkpoint.decider_role != Role.OWNER
        ):
            Checkpoint.objects.filter(id=checkpoint.id).update(
                decider_role=Role.OWNER, expires_at=None
            )
            event_append(
                group_id=checkpoint.group_id,
                kind="checkpoint.escalated",
                task_id=checkpoint.task_id,
                payload={"checkpoint_id": checkpoint.id},
            )
            return "escalated"
        _resolve(checkpoint, CheckpointStatus.EXPIRED, note="expired", actor_id=None)
        return CheckpointStatus.EXPIRED


def checkpoint_mark_delivered(*, checkpoint_id: int) -> bool:
    return bool(
        Checkpoint.objects.filter(id=checkpoint_id, delivered_at=None)
        .exclude(status=CheckpointStatus.PENDING)
        .update(delivered_at=timezone.now())
    )


def checkpoints_cancel_for_tasks(*, task_ids: list[int]) -> int:
    """Called inside task_cancel's transaction: pending checkpoints of cancelled tasks go too."""
    return Checkpoint.objects.filter(task_id__in=task_ids, status=CheckpointStatus.PENDING).update(
        status=CheckpointStatus.CANCELLED, resolved_at=timezone.now()
    )
