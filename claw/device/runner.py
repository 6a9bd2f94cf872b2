"""Running one attempt of a task: its explicit `steps`, in order, each a tool call.

* Each step ends with a `progress` frame of kind `step`: `{"index", "tool", "args", "ok",
  "output"}` (+ `"error"`), strings shortened to keep frames small.
* A step whose tool is `checkpoint` (args: `title`, `details`, `options`) sends
  `checkpoint_request` and waits for the `decision`: approved → go on; rejected or expired →
  the attempt fails (not retryable); cancelled → stop quietly (the task was cancelled).
  Changes requested → the note is new input: it is logged as a `progress` item of kind
  `log` (`{"index", "checkpoint_id", "changes_requested": note, "round"}`), kept in
  `AttemptRunner.feedback`, and the checkpoint step runs again, its details now listing the
  notes so far, so the humans see what was asked and can approve or reject. Explicit steps
  cannot change themselves, so after MAX_CHANGE_ROUNDS such rounds the attempt fails (not
  retryable). A runtime with a model would pass `feedback` to its loop instead.
* A task whose spec carries `feedback` (a reviewer asked for changes to an earlier result)
  logs it first (`progress` kind `log`, `{"feedback": note}`), keeps it in
  `AttemptRunner.feedback`, and reports it back in the result (`"feedback"`).
* A failing step fails the attempt, retryable only when the tool said so (a timeout, say).
* All steps done → `complete` with `{"steps": [summaries]}`.
* A task without steps is run by the model loop (claw.device.llm) when the agent has the
  `llm` toolkit (`claw agent run --llm`), and declined (`missing_tool`) otherwise.

A journal file per attempt (in the agent's state folder) records the steps done and the next
progress seq once the server acknowledged them, so an agent restarted after a crash resumes
an attempt it still owns at the first unacknowledged step (that step runs again: tools are
at-least-once across crashes) and keeps numbering progress where it left off. Without a
journal the attempt restarts from step 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from claw import protocol
from claw.device.toolkits import ToolContext, ToolError, Toolkit, resolve_tool

logger = logging.getLogger("claw.device")

CHECKPOINT_TOOL = "checkpoint"
MAX_CHANGE_ROUNDS = 3
PROGRESS_STRING_CHARS = 4000
RESULT_BUDGET = protocol.MAX_RESULT_BYTES - 8 * 1024
NO_MODEL = "no model runtime yet: this agent runs explicit steps only"


class FrameRejected(Exception):
    """The server answered a frame with `error`."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class Session(Protocol):
    """What a runner needs from the connection (AgentClient implements it)."""

    async def request(self, model: type[protocol.Frame], **fields: Any) -> dict: ...

    async def wait_decision(self, checkpoint_id: int) -> protocol.Decision: ...

    async def confirm_decision(self, checkpoint_id: int) -> None: ...


def clean(text: str) -> str:
    """Text the server can store: no U+0000 and no lone surrogates (binary tool output)."""
    text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def summarize(value: Any, max_chars: int = PROGRESS_STRING_CHARS, max_items: int = 50) -> Any:
    """A JSON-able copy with long strings and lists shortened (marked as such) and text
    cleaned for storage."""
    if isinstance(value, str):
        if len(value) <= max_chars:
            return clean(value)
        return clean(value[:max_chars]) + f"…[{len(value) - max_chars} more chars]"
    if isinstance(value, dict):
        return {clean(str(k)): summarize(v, max_chars, max_items) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [summarize(v, max_chars, max_items) for v in value[:max_items]]
        if len(value) > max_items:
            items.append(f"…[{len(value) - max_items} more items]")
        return items
    if value is None or isinstance(value, bool | int | float):
        return value
    return summarize(str(value), max_chars, max_items)


def fit(value: Any, budget: int) -> Any:
    """`value` summarized ever shorter until its JSON fits in `budget` bytes."""
    chars, items = PROGRESS_STRING_CHARS, 50
    while True:
        short = summarize(value, chars, items)
        if len(json.dumps(short).encode()) <= budget or chars <= 16:
            return short
        chars, items = chars // 2, max(items // 2, 3)


def check_task(task: protocol.TaskSpec, toolkits: dict[str, Toolkit]) -> tuple[str, str] | None:
    """Why this agent cannot run the task, as a decline (reason, message); None if it can."""
    missing = [slug for slug in task.required_toolkits if slug not in toolkits]
    if missing:
        return "missing_tool", f"this agent lacks toolkit(s) {', '.join(missing)}"
    if not task.steps:
        if getattr(toolkits.get("llm"), "runs_tasks", False):
            return None
        return "missing_tool", NO_MODEL
    for index, step in enumerate(task.steps):
        tool = step.get("tool")
        if not isinstance(tool, str) or not isinstance(step.get("args", {}), dict):
            return "other", f"step {index} is not a {{tool, args}} call"
        if tool == CHECKPOINT_TOOL:
            continue
        try:
            resolve_tool(toolkits, tool)
        except ToolError as exc:
            return "missing_tool", f"step {index}: {exc.message}"
    return None


class Journal:
    """One attempt's progress on disk (mode 0600), or nowhere when `directory` is None."""

    def __init__(self, directory: Path | None, attempt_id: int):
        self.path = directory / f"attempt-{attempt_id}.json" if directory else None

    def load(self, epoch: int) -> dict | None:
        if self.path is None:
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("epoch") == epoch else None

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle)
        os.replace(tmp, self.path)

    def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @staticmethod
    def prune(directory: Path | None, keep: set[int]) -> None:
        """Remove the journals of attempts this agent no longer owns."""
        if directory is None or not directory.is_dir():
            return
        for path in directory.glob("attempt-*.json"):
            with contextlib.suppress(ValueError, FileNotFoundError):
                if int(path.stem.removeprefix("attempt-")) not in keep:
                    path.unlink()


@dataclass
class Failure:
    error: str
    retryable: bool = False
    cancelled: bool = False  # the task was cancelled: stop without writing anything


class AttemptRunner:
    def __init__(
        self,
        assignment: protocol.Assignment,
        *,
        session: Session,
        toolkits: dict[str, Toolkit],
        workdir: Path,
        journal: Journal | None = None,
    ):
        self.assignment = assignment
        self.session = session
        self.toolkits = toolkits
        self.journal = journal or Journal(None, assignment.attempt_id)
        self.ctx = ToolContext(
            workdir=workdir,
            task_id=assignment.task.id,
            attempt_id=assignment.attempt_id,
            epoch=assignment.epoch,
        )
        self.accepted = assignment.status == "running"
        self.finishing = False  # its complete or fail has been sent
        self.outcome: str | None = None
        # Notes from humans, oldest first: the task's review feedback, then changes
        # requested at this attempt's checkpoints. New input for whatever runs the task.
        self.feedback: list[str] = [assignment.task.feedback] if assignment.task.feedback else []

    @property
    def ids(self) -> dict[str, int]:
        return {"attempt_id": self.assignment.attempt_id, "epoch": self.assignment.epoch}

    def _log(self, message: str, *args: Any, level: int = logging.INFO) -> None:
        task = self.assignment.task
        logger.log(
            level, f"attempt %s (task %s): {message}", self.ids["attempt_id"], task.id, *args
        )

    async def run(self) -> str:
        """Run to an outcome: succeeded, failed, stale (no longer ours), cancelled (by a
        decision or the caller), or error (the server refused our frames)."""
        try:
            self.outcome = await self._run()
        except FrameRejected as exc:
            if exc.code in ("stale_attempt", "not_found"):
                self._log("no longer ours (%s); stopping", exc.message, level=logging.WARNING)
                self.outcome = "stale"
            else:
                self._log("the server refused a frame: %s", exc, level=logging.ERROR)
                self.outcome = "error"
                with contextlib.suppress(FrameRejected):
                    await self.session.request(
                        protocol.Fail,
                        **self.ids,
                        error=f"agent protocol error: {exc}"[:2000],
                        retryable=False,
                    )
        return self.outcome

    async def _run(self) -> str:
        task = self.assignment.task
        if not self.accepted:
            await self.session.request(protocol.Accept, **self.ids)
            self.accepted = True
            self._log("accepted %r (%d step(s))", task.title, len(task.steps))
        state = self.journal.load(self.assignment.epoch)
        if state is None:
            state = {"epoch": self.assignment.epoch, "next_seq": 1, "steps": [], "checkpoint": None}
            if self.assignment.status == "running":
                self._log("resuming from step 0 (no journal on this machine)")
            if task.feedback:
                self._log("changes were requested: %s", task.feedback)
                await self._progress("log", {"feedback": summarize(task.feedback)}, state)
                self.journal.save(state)
        else:
            self._log("resuming at step %d (journal)", len(state["steps"]))

        if not task.steps:
            from claw.device.llm import run_llm_loop

            return await run_llm_loop(self, self.toolkits["llm"], state)

        for index in range(len(state["steps"]), len(task.steps)):
            step = task.steps[index]
            tool, args = step["tool"], step.get("args") or {}
            if tool == CHECKPOINT_TOOL:
                output, failure = await self._checkpoint(index, args, state)
            else:
                output, failure = await self._tool(index, tool, args)
            if failure is not None and failure.cancelled:
                self._log("stopping: %s", failure.error)
                return "cancelled"
            data = {
                "index": index,
                "tool": tool,
                "args": summarize(args, 500),
                "ok": failure is None,
                "output": output,
            }
            if failure is not None:
                data["error"] = failure.error
            else:
                self._log("step %d (%s) done", index, tool)
            await self._progress("step", data, state)
            if failure is None:
                state["steps"].append({"index": index, "tool": tool, "output": output})
            self.journal.save(state)
            if tool == CHECKPOINT_TOOL:
                await self.session.confirm_decision(output["checkpoint_id"])
            if failure is not None:
                self._log("step %d (%s) failed: %s", index, tool, failure.error)
                self.finishing = True
                answer = await self.session.request(
                    protocol.Fail,
                    **self.ids,
                    error=clean(f"step {index} ({tool}): {failure.error}")[:2000],
                    retryable=failure.retryable,
                )
                self._log("failed; the task is now %s", answer.get("task_status"))
                return "failed"

        result = {"steps": fit(state["steps"], RESULT_BUDGET - 100)}
        if task.feedback:
            result["feedback"] = summarize(task.feedback, 2000)
        self.finishing = True
        await self.session.request(protocol.Complete, **self.ids, result=result)
        self._log("succeeded")
        return "succeeded"

    async def _progress(self, kind: str, data: dict, state: dict) -> None:
        data = fit(data, protocol.MAX_FRAME_BYTES // 2)
        await self.session.request(
            protocol.Progress, **self.ids, seq=state["next_seq"], kind=kind, data=data
        )
        state["next_seq"] += 1

    async def _tool(self, index: int, tool: str, args: dict) -> tuple[dict, Failure | None]:
        try:
            toolkit, name = resolve_tool(self.toolkits, tool)
            self._log("step %d: %s", index, tool)
            output = await toolkit.run(name, args, self.ctx)
        except ToolError as exc:
            return summarize(exc.output or {}), Failure(exc.message, exc.retryable)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("tool %s crashed", tool)
            return {}, Failure(f"the tool crashed: {type(exc).__name__}: {exc}")
        if not isinstance(output, dict):
            output = {"value": output}
        return summarize(json.loads(json.dumps(output, default=str))), None

    async def _checkpoint(self, index: int, args: dict, state: dict) -> tuple[dict, Failure | None]:
        notes: list[str] = []
        while True:
            pending = state.get("checkpoint")
            if pending and pending["index"] == index:
                checkpoint_id, notes = pending["id"], pending.get("notes", [])
            else:
                options = args.get("options") or []
                details = clean(str(args.get("details") or ""))
                if notes:
                    asked = "\n".join(f"- {clean(note)}" for note in notes)
                    details = f"{details}\n\nChanges requested so far:\n{asked}".strip()
                answer = await self.session.request(
                    protocol.CheckpointRequest,
                    **self.ids,
                    title=clean(str(args.get("title") or f"Checkpoint at step {index}"))[:200],
                    details=details[-20000:],
                    options=[clean(str(option))[:100] for option in options[:10]],
                )
                checkpoint_id = answer["checkpoint_id"]
                state["checkpoint"] = {"index": index, "id": checkpoint_id, "notes": notes}
                self.journal.save(state)
            self._log("waiting for a decision on checkpoint %s", checkpoint_id)
            decision = await self.session.wait_decision(checkpoint_id)
            state["checkpoint"] = None
            self._log("checkpoint %s: %s", checkpoint_id, decision.status)
            if decision.status != "changes_requested" or len(notes) >= MAX_CHANGE_ROUNDS:
                break
            # New input from the humans: log it, keep it, and ask again.
            notes = [*notes, decision.note]
            self.feedback.append(decision.note)
            await self._progress(
                "log",
                {
                    "index": index,
                    "checkpoint_id": checkpoint_id,
                    "changes_requested": summarize(decision.note),
                    "round": len(notes),
                },
                state,
            )
            self.journal.save(state)
            await self.session.confirm_decision(checkpoint_id)
        output = {"checkpoint_id": checkpoint_id, "status": decision.status, "note": decision.note}
        if notes:
            output["changes_requested"] = notes
        note = f": {decision.note}" if decision.note else ""
        match decision.status:
            case "approved":
                return output, None
            case "rejected":
                return output, Failure(f"checkpoint rejected{note}")
            case "changes_requested":
                return output, Failure(
                    f"changes requested{note} (asked {len(notes) + 1} times; these explicit "
                    "steps cannot change themselves)"
                )
            case "expired":
                return output, Failure("the checkpoint expired without a decision")
            case _:
                await self.session.confirm_decision(checkpoint_id)
                return output, Failure(f"checkpoint {decision.status}", cancelled=True)
