import logging
from datetime import datetime, timedelta

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
from apps.groups.models import DECIDER_ROLES, Group, Role
from apps.groups.selectors import require_role
from apps.tasks.models import Attempt, Task, TaskStatus
from claw.errors import InvalidInput, InvalidTransition

logger = logging.getLogger(__name__)

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
    required_approvals: int | None = None,
    decider_role: str | None = None,
    expires_at: datetime | None = None,
    expiry_action: str | None = None,
    proposal: dict | None = None,
) -> Checkpoint:
    """Ask the group's humans for a decision. The quorum, the decider role and the expiry
    (with its action) default to the group's checkpoint policies.

    A before_start checkpoint on a task holds the task (a ready one goes back to waiting)
    until it is approved; a review checkpoint is raised by attempt_complete for tasks whose
    results are reviewed. See _act_on_resolution for what each outcome does."""
    if required_approvals is None:
        required_approvals = group.checkpoint_required_approvals
    decider_role = decider_role or group.checkpoint_decider_role
    expiry_action = expiry_action or group.checkpoint_expiry_action
    if expires_at is None and group.checkpoint_expiry_s:
        expires_at = timezone.now() + timedelta(seconds=group.checkpoint_expiry_s)
    title = title.strip()
    if not title or len(title) > 200:
        raise InvalidInput("A checkpoint needs a title of 1 to 200 characters.")
    if source not in CheckpointSource.values:
        raise InvalidInput(f"source must be one of {', '.join(CheckpointSource.values)}.")
    if kind not in CheckpointKind.values:
        raise InvalidInput(f"kind must be one of {', '.join(CheckpointKind.values)}.")
    if not 1 <= required_approvals <= 20:
        raise InvalidInput("required_approvals must be from 1 to 20.")
    if decider_role not in DECIDER_ROLES:
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
            proposal=proposal,
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
                "required_approvals": required_approvals,
                "decider_role": decider_role,
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
        if kind == CheckpointKind.BEFORE_START and task is not None:
            _hold_task(task)
    return checkpoint


def _hold_task(task: Task) -> None:
    """A ready task waits again while a before-start checkpoint on it is pending."""
    if Task.objects.filter(id=task.id, status=TaskStatus.READY).update(status=TaskStatus.WAITING):
        event_append(
            group_id=task.group_id,
            kind="task.waiting",
            task_id=task.id,
            payload={"status": TaskStatus.WAITING, "reason": "waiting for approval to start"},
        )


def _resolve(checkpoint: Checkpoint, status: str, *, note: str = "", actor_id: int | None) -> None:
    """Resolve a pending checkpoint; an agent that asked gets the outcome after commit. A
    checkpoint no agent waits for (raised by a policy, the system or a human) counts as
    delivered at once, so it is not replayed in a `welcome`."""
    now = timezone.now()
    asked_by_agent = checkpoint.source == CheckpointSource.AGENT and checkpoint.attempt_id
    updated = Checkpoint.objects.filter(id=checkpoint.id, status=CheckpointStatus.PENDING).update(
        status=status, resolved_at=now, delivered_at=None if asked_by_agent else now
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
    if asked_by_agent:
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
        _lock_task_of(checkpoint)
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
        if current.kind == CheckpointKind.BEFORE_START and verdict == Verdict.REQUEST_CHANGES:
            raise InvalidInput(
                "A task's start is approved or rejected; to change the task, reject it and "
                "create it anew.",
                code="verdict_not_allowed",
            )
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
            outcome = VERDICT_OUTCOME[verdict]
            _resolve(current, outcome, note=note, actor_id=actor.pk)
            _act_on_resolution(
                current, outcome, note=note, option=option, assign_to=assign_to, actor=actor
            )
    return decision


def _lock_task_of(checkpoint: Checkpoint) -> None:
    """Lock the checkpoint's task before the checkpoint: the order task_cancel takes them in
    (task, then its checkpoints), so a decision and a cancellation never deadlock."""
    if checkpoint.task_id is not None:
        list(Task.objects.select_for_update(no_key=True).filter(id=checkpoint.task_id))


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
    checkpoint: Checkpoint,
    outcome: str,
    *,
    note: str = "",
    option: str = "",
    assign_to: int | None = None,
    actor: AbstractBaseUser | None = None,
) -> None:
    """What a resolution does beyond resolving, by kind (an expiry acts as a reject):

    * max_attempts, approved: "retry" retries the task, "reassign" retries it on the chosen
      agent at once (that agent must be able to take it, or the whole decision is refused);
      "cancel" leaves the task failed.
    * before_start: approved → the task may start (ready once its dependencies succeeded);
      rejected or expired → the task is cancelled (with its sub-tree).
    * review: approved → the task succeeds with the reviewed result; rejected or expired →
      the attempt is rejected and the task fails; changes requested → a new attempt, with
      the note as the task's feedback, preferably on the same agent.
    * plan: approved → the proposal's tasks are created under the goal task
      (apps.tasks.planner.plan_apply); changes requested → the planner is asked again with
      the note; rejected or expired → nothing more.
    * budget, approved: the group's model token budget grows by the option ("+50%",
      "+100%"; +50% when none is named).
    * agent requests: nothing here; the waiting agent gets the outcome.
    """
    from apps.tasks import services as tasks

    actor_id = actor.pk if actor is not None else None
    task_id = checkpoint.task_id
    approved = outcome == CheckpointStatus.APPROVED
    refused = outcome in (CheckpointStatus.REJECTED, CheckpointStatus.EXPIRED)
    match checkpoint.kind:
        case CheckpointKind.MAX_ATTEMPTS if approved and option in {"retry", "reassign"}:
            task = tasks.task_retry(actor=actor, task=checkpoint.task)
            if option == "reassign":
                tasks.task_assign(
                    task_id=task.id,
                    agent_id=assign_to,
                    choice={"reason": f"reassigned by {actor.get_username()} at checkpoint"},
                )
        case CheckpointKind.BEFORE_START if task_id is not None and approved:
            tasks.task_start_approve(task_id=task_id, actor_id=actor_id)
        case CheckpointKind.BEFORE_START if task_id is not None and refused:
            tasks.task_start_reject(
                task_id=task_id, reason=f"start {outcome} at checkpoint {checkpoint.id}"
            )
        case CheckpointKind.REVIEW if task_id is not None and _in_review(task_id):
            if approved:
                tasks.task_result_accept(task_id=task_id, actor_id=actor_id)
            elif refused:
                tasks.task_result_reject(task_id=task_id, note=note, actor_id=actor_id)
            elif outcome == CheckpointStatus.CHANGES_REQUESTED:
                tasks.task_result_request_changes(task_id=task_id, note=note, actor_id=actor_id)
        case CheckpointKind.BUDGET if approved:
            from apps.llm.services import group_llm_budget_raise

            group_llm_budget_raise(
                group_id=checkpoint.group_id,
                option=option,
                actor_id=actor_id,
                checkpoint_id=checkpoint.id,
            )
        case CheckpointKind.PLAN if task_id is not None and checkpoint.proposal is not None:
            from apps.tasks import planner

            if approved:
                planner.plan_apply(checkpoint=checkpoint, actor=actor)
            elif outcome == CheckpointStatus.CHANGES_REQUESTED:
                planner.plan_replan(checkpoint=checkpoint, note=note, actor=actor)


def _in_review(task_id: int) -> bool:
    return Task.objects.filter(id=task_id, status=TaskStatus.REVIEW).exists()


def checkpoint_expire(*, checkpoint_id: int) -> str | None:
    """Apply a pending checkpoint's expiry action once it is due. Idempotent. `escalate`
    hands the decision to owners (once; it then waits without a deadline); `reject` resolves
    it as expired, which acts as a reject (see _act_on_resolution)."""
    with transaction.atomic():
        due = Checkpoint.objects.filter(id=checkpoint_id).only("id", "task_id").first()
        if due is None:
            return None
        _lock_task_of(due)
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
                payload={"checkpoint_id": checkpoint.id, "decider_role": Role.OWNER},
            )
            return "escalated"
        _resolve(checkpoint, CheckpointStatus.EXPIRED, note="expired", actor_id=None)
        _act_on_resolution(checkpoint, CheckpointStatus.EXPIRED, note="expired")
        return CheckpointStatus.EXPIRED


def checkpoints_sweep_expired(*, limit: int = 500) -> int:
    """Beat's sweeper: apply the expiry action of every pending checkpoint that is due (one
    indexed query when none is). One failing checkpoint is logged and skipped; the next
    sweep tries it again. Returns how many were expired or escalated."""
    due = (
        Checkpoint.objects.filter(status=CheckpointStatus.PENDING, expires_at__lte=timezone.now())
        .order_by("expires_at")
        .values_list("id", flat=True)[:limit]
    )
    done = 0
    for checkpoint_id in list(due):
        try:
            done += checkpoint_expire(checkpoint_id=checkpoint_id) is not None
        except Exception:
            logger.exception("expiring checkpoint %s failed", checkpoint_id)
    return done


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
