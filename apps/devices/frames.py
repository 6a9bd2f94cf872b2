"""Services for the agent protocol's effectful frames (accept, decline, progress, complete,
fail, checkpoint_request, decision_received).

Each frame runs at most once per (agent, client message id): the answer is stored in the
same transaction as the effect, so a frame replayed after a reconnect gets the stored answer
and changes nothing. Errors are stored too, so the replay's answer is the same.
"""

import json

from django.db import IntegrityError, transaction

from apps.checkpoints.models import Checkpoint, CheckpointSource
from apps.checkpoints.services import checkpoint_mark_delivered, checkpoint_raise
from apps.devices.models import Agent, AgentMessage
from apps.events.services import event_append
from apps.tasks.models import Attempt
from apps.tasks.services import (
    attempt_accept,
    attempt_complete,
    attempt_decline,
    attempt_fail,
    attempt_progress,
)
from claw import protocol
from claw.errors import DomainError, InvalidInput, NotFound, StaleAttempt


def _fenced_attempt_for_checkpoint(agent: Agent, attempt_id: int, epoch: int) -> Attempt:
    attempt = Attempt.objects.select_related("task").filter(id=attempt_id, agent=agent).first()
    if attempt is None:
        raise NotFound(f"Attempt {attempt_id} is not this agent's.")
    if attempt.epoch != epoch or attempt.status != "running" or attempt.task.epoch != epoch:
        raise StaleAttempt(f"Attempt {attempt_id} (epoch {epoch}) no longer holds its task.")
    return attempt


def _apply(agent: Agent, frame) -> dict:
    match frame:
        case protocol.Accept():
            attempt = attempt_accept(attempt_id=frame.attempt_id, agent=agent, epoch=frame.epoch)
            return {
                "status": attempt.status,
                "lease_expires_at": attempt.lease_expires_at.isoformat(),
            }
        case protocol.Decline():
            reason = f"{frame.reason}: {frame.message}" if frame.message else frame.reason
            attempt_decline(
                attempt_id=frame.attempt_id, agent=agent, epoch=frame.epoch, reason=reason
            )
            return {"status": "declined"}
        case protocol.Progress():
            seq = attempt_progress(
                attempt_id=frame.attempt_id,
                agent=agent,
                epoch=frame.epoch,
                kind=frame.kind,
                payload={**frame.data, "seq": frame.seq},  # the protocol's seq wins
            )
            return {"event_seq": seq}
        case protocol.Complete():
            if len(json.dumps(frame.result)) > protocol.MAX_RESULT_BYTES:
                raise InvalidInput(
                    f"A result is at most {protocol.MAX_RESULT_BYTES} bytes; upload larger "
                    "outputs as artifacts.",
                    code="too_big",
                )
            attempt_complete(
                attempt_id=frame.attempt_id, agent=agent, epoch=frame.epoch, result=frame.result
            )
            return {"status": "succeeded"}
        case protocol.Fail():
            status = attempt_fail(
                attempt_id=frame.attempt_id,
                agent=agent,
                epoch=frame.epoch,
                error=frame.error,
                retryable=frame.retryable,
            )
            return {"task_status": status}
        case protocol.CheckpointRequest():
            attempt = _fenced_attempt_for_checkpoint(agent, frame.attempt_id, frame.epoch)
            checkpoint = checkpoint_raise(
                group=attempt.task.group,
                task=attempt.task,
                attempt=attempt,
                source=CheckpointSource.AGENT,
                title=frame.title,
                details=frame.details,
                options=list(frame.options),
            )
            return {"checkpoint_id": checkpoint.id}
        case protocol.DecisionReceived():
            if not Checkpoint.objects.filter(id=frame.checkpoint_id, attempt__agent=agent).exists():
                raise NotFound(f"Checkpoint {frame.checkpoint_id} is not for this agent.")
            return {"first_delivery": checkpoint_mark_delivered(checkpoint_id=frame.checkpoint_id)}
    raise InvalidInput(f"Frame type {frame.type} has no effect to apply.")


def _record_stale_write(agent: Agent, frame, exc: StaleAttempt) -> None:
    attempt = Attempt.objects.select_related("task").filter(id=frame.attempt_id).first()
    if attempt is None:
        return
    event_append(
        group_id=attempt.task.group_id,
        kind="attempt.stale_write",
        task_id=attempt.task_id,
        attempt_id=attempt.id,
        agent_id=agent.id,
        payload={"frame": frame.type, "epoch": frame.epoch, "reason": exc.message},
    )


def agent_message_once(*, agent_id: int, frame) -> dict:
    """Apply an effectful frame at most once; return the ack or error frame (as a dict)."""
    stored = AgentMessage.objects.filter(agent_id=agent_id, client_id=frame.id).first()
    if stored is not None:
        return stored.response
    agent = Agent.objects.select_related("group").get(id=agent_id)
    try:
        with transaction.atomic():
            response = protocol.Ack(re=frame.id, result=_apply(agent, frame)).model_dump(
                mode="json"
            )
            AgentMessage.objects.create(agent=agent, client_id=frame.id, response=response)
        return response
    except IntegrityError:
        # The same id raced in on another connection; its answer is the answer.
        return AgentMessage.objects.get(agent_id=agent_id, client_id=frame.id).response
    except DomainError as exc:
        response = protocol.Error(re=frame.id, code=exc.code, message=exc.message).model_dump(
            mode="json"
        )
        with transaction.atomic():
            stored, created = AgentMessage.objects.get_or_create(
                agent=agent, client_id=frame.id, defaults={"response": response}
            )
            if created and isinstance(exc, StaleAttempt) and hasattr(frame, "epoch"):
                _record_stale_write(agent, frame, exc)
        return stored.response
