"""Services for the agent protocol's effectful frames (accept, decline, progress, complete,
fail, checkpoint_request, decision_received).

Each frame runs at most once per (agent, client message id): the answer is stored in the
same transaction as the effect, so a frame replayed after a reconnect gets the stored answer
and changes nothing. Errors are stored too, so the replay's answer is the same.
"""

import json

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from apps.checkpoints.models import Checkpoint, CheckpointSource
from apps.checkpoints.services import checkpoint_mark_delivered, checkpoint_raise
from apps.devices.models import Agent, AgentMessage
from apps.events.services import event_append, event_append_many, execute_with_arrays
from apps.tasks.models import Attempt, AttemptStatus
from apps.tasks.services import (
    PROGRESS_KINDS,
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


def _progress_fence(agent_id: int, frame: protocol.Progress, attempt: dict | None) -> None:
    """attempt_progress's checks, on a row of agent_progress_many's one read."""
    if frame.kind not in PROGRESS_KINDS:
        raise InvalidInput(f"Progress kind must be one of {', '.join(sorted(PROGRESS_KINDS))}.")
    if attempt is None or attempt["agent_id"] != agent_id:
        raise NotFound(f"Attempt {frame.attempt_id} is not this agent's.")
    status, task_epoch = attempt["status"], attempt["task__epoch"]
    if (
        attempt["epoch"] != frame.epoch
        or task_epoch != frame.epoch
        or status != AttemptStatus.RUNNING
    ):
        raise StaleAttempt(
            f"Attempt {frame.attempt_id} (epoch {frame.epoch}) no longer holds task "
            f"{attempt['task_id']} (attempt is {status}, task epoch {task_epoch}).",
            details={"task_epoch": task_epoch, "attempt_status": status},
        )


STORE_ANSWERS = """
INSERT INTO devices_agentmessage (agent_id, client_id, response, created_at)
SELECT a.agent_id, a.client_id, a.response::jsonb, %s
FROM unnest(%b::bigint[], %b::text[], %b::text[]) AS a (agent_id, client_id, response)
"""


def _store_answers(answers: dict[tuple[int, str], dict]) -> None:
    """AgentMessage rows for a batch's answers: one insert, one array per column on
    PostgreSQL (see execute_with_arrays)."""
    if not answers:
        return
    if connection.vendor != "postgresql":
        AgentMessage.objects.bulk_create(
            AgentMessage(agent_id=agent_id, client_id=client_id, response=response)
            for (agent_id, client_id), response in answers.items()
        )
        return
    agent_ids, client_ids = zip(*answers, strict=True)
    responses = [json.dumps(response) for response in answers.values()]
    execute_with_arrays(
        STORE_ANSWERS, [timezone.now(), list(agent_ids), list(client_ids), responses]
    )


def agent_progress_many(*, frames: list[tuple[int, protocol.Progress]]) -> list[dict]:
    """agent_message_once for a batch of (agent id, progress frame), in arrival order: one
    transaction for all, one seq bump and one insert of events per group, one insert of the
    stored answers. Returns each frame's ack or error, in order.

    Each frame is checked on its own before the write (a stale frame gets its error, stored
    like any answer, and the others land), a replayed id gets its stored answer, and a
    frame repeated within the batch gets the answer of its first copy. Events are numbered
    in arrival order, so an attempt's progress keeps its order. Callers fall back to
    agent_message_once per frame if this raises IntegrityError (an id that raced in
    elsewhere).
    """
    keys = list(dict.fromkeys((agent_id, frame.id) for agent_id, frame in frames))
    stored = {
        (agent_id, client_id): response
        for agent_id, client_id, response in AgentMessage.objects.filter(
            agent_id__in={agent_id for agent_id, _ in keys}, client_id__in={c for _, c in keys}
        ).values_list("agent_id", "client_id", "response")
    }
    attempts = {
        row["id"]: row
        for row in Attempt.objects.filter(id__in={frame.attempt_id for _, frame in frames}).values(
            "id", "agent_id", "epoch", "status", "task_id", "task__epoch", "task__group_id"
        )
    }
    answers: dict[tuple[int, str], dict] = {}
    events: dict[int, list[dict]] = {}  # per group, in arrival order
    acked: dict[int, list[tuple[int, str]]] = {}  # per group: whose event is which
    for agent_id, frame in frames:
        key = (agent_id, frame.id)
        if key in answers or key in stored:
            continue
        attempt = attempts.get(frame.attempt_id)
        try:
            _progress_fence(agent_id, frame, attempt)
        except DomainError as exc:
            answers[key] = protocol.Error(
                re=frame.id, code=exc.code, message=exc.message
            ).model_dump(mode="json")
            if isinstance(exc, StaleAttempt):
                events.setdefault(attempt["task__group_id"], []).append(
                    {
                        "kind": "attempt.stale_write",
                        "task_id": attempt["task_id"],
                        "attempt_id": frame.attempt_id,
                        "agent_id": agent_id,
                        "payload": {
                            "frame": frame.type,
                            "epoch": frame.epoch,
                            "reason": exc.message,
                        },
                    }
                )
            continue
        answers[key] = {}  # the ack, once its event has a number
        group_id = attempt["task__group_id"]
        events.setdefault(group_id, []).append(
            {
                "kind": f"progress.{frame.kind}",
                "task_id": attempt["task_id"],
                "attempt_id": frame.attempt_id,
                "agent_id": agent_id,
                "payload": {**frame.data, "seq": frame.seq},  # the protocol's seq wins
            }
        )
        acked.setdefault(group_id, []).append(key)
    with transaction.atomic():
        for group_id in sorted(events):  # the same lock order in every batch
            created = event_append_many(group_id=group_id, events=events[group_id])
            progress = [e for e in created if e.kind.startswith("progress.")]
            for key, event in zip(acked.get(group_id, []), progress, strict=True):
                answers[key] = protocol.Ack(re=key[1], result={"event_seq": event.seq}).model_dump(
                    mode="json"
                )
        _store_answers(answers)
    answers.update(stored)
    return [answers[(agent_id, frame.id)] for agent_id, frame in frames]
