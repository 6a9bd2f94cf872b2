"""The model loop: how an agent started with `claw agent run --llm` runs a task that has
natural-language instructions and no explicit steps.

The agent declares the `llm` toolkit (LLMToolkit), so tasks requiring `llm` only go to
agents that can run them. For each such attempt, run_llm_loop talks to an OpenAI-compatible
chat endpoint — the server's model gateway at `<server>/v1` by default, the device token as
the API key, `X-Claw-Attempt` / `X-Claw-Epoch` on every request — with the `openai` SDK
(AsyncOpenAI, streaming), in a tool-calling loop:

* Tools: the agent's toolkits' tools (`shell.run` is offered as `shell__run`: function
  names allow no dots; the dotted name is accepted back too), plus the platform tools
  `request_checkpoint` (waits for the humans' decision; "request changes" comes back as
  the tool result, a rejection or expiry fails the attempt), `write_artifact` (a text
  artifact of this task, through the artifact HTTP API with the device token), and
  `report_done(result)` / `report_failure(error, retryable)`, which end the attempt.
  Reading other tasks' artifacts is not offered: that API takes people's credentials only.
* Progress: each model turn is a `log` item (`{"turn", "reasoning", "content",
  "tool_calls", "usage", "finish_reason"}`, texts shortened), each tool call a `tool_call`
  item (`{"turn", "id", "tool", "args", "ok", "output"}` + `"error"`).
* Tool-call ids are echoed exactly as the model sent them (Kimi: `functions.NAME:IDX`), and
  the assistant's `reasoning_content` is kept in the conversation (thinking models expect
  it back across tool calls).
* Robustness: malformed tool arguments, an unknown tool or a failing tool → the error is the
  tool's result, for the model to correct; a reply with neither a tool call nor an answer
  (say, after a long think) → one nudge, then the attempt fails (retryable); a plain-text
  answer without report_done → one nudge, then that text is the result. At most
  `max_turns` model calls. Before each call the conversation is estimated
  (`chars_per_token`, or the server's last prompt_tokens count) against `context_tokens`;
  over it, old tool outputs are shortened, then cut, and a conversation that still does not
  fit fails the attempt. Cancelling the attempt cancels the request in flight.
* The task's review feedback (TaskSpec.feedback) is part of the prompt, and the group's
  skills for its toolkits (TaskSpec.skills) are part of the system prompt, under "# Skills".
* An attempt resumed after the agent restarted starts its conversation again (the journal
  keeps the progress numbering and a checkpoint it was waiting on); tools are
  at-least-once, as with explicit steps. A restart while waiting for a decision waits for
  that same checkpoint, and the new conversation starts with its decision, so the model
  does not ask the humans the same thing twice.
* Model errors: HTTP 402/408/425/429/5xx and connection failures fail the attempt as
  retryable, other refusals (a bad key, a stale attempt at the gateway) as not.

Nothing here imports Django.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from claw import protocol
from claw.device.runner import RESULT_BUDGET, AttemptRunner, clean, fit, summarize
from claw.device.toolkits import ToolContext, ToolError, Toolkit, resolve_tool

logger = logging.getLogger("claw.device")

DEFAULT_MODEL = "kimi-k2.6"
KEEP_RECENT_TOOL_OUTPUTS = 4
SHORT_OUTPUT_CHARS = 1500
CUT_OUTPUT_CHARS = 200
NUDGE_EMPTY = (
    "Your last reply had no answer and no tool call. Continue the task: call a tool, or "
    "finish with report_done (or report_failure)."
)
NUDGE_TEXT = (
    "To finish, call report_done with your result (or report_failure if you cannot do the "
    "task). Otherwise, continue with a tool call."
)


@dataclass
class LLMSettings:
    base_url: str
    api_key: str
    model: str = DEFAULT_MODEL
    max_turns: int = 50
    # The conversation's budget before old tool outputs are shortened (K2.6 reads 256K
    # tokens; this leaves room for the answer).
    context_tokens: int = 200_000
    chars_per_token: float = 3.5  # the estimate used until the server counts a prompt
    max_output_tokens: int = 16_384
    temperature: float | None = None  # None: the server's (or gateway's) default
    read_timeout_s: float = 600.0
    max_retries: int = 2
    # The Claw server (http(s)://host) and device token, for write_artifact; None: no
    # artifact tool.
    server: str | None = None
    token: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)


class LLMToolkit(Toolkit):
    """The `llm` toolkit: this agent runs a model. It has no step tools; a task without
    explicit steps is run by run_llm_loop instead."""

    slug, version, default_tool = "llm", "1.0", None
    runs_tasks = True  # what claw.device.runner checks for tasks without steps

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self._client: openai.AsyncOpenAI | None = None

    def schemas(self) -> list[dict[str, Any]]:
        return []

    async def run(self, tool: str, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        raise ToolError("llm has no step tools: a task without steps is run by the model loop.")

    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key or "none",
                timeout=httpx.Timeout(self.settings.read_timeout_s, connect=10.0),
                max_retries=self.settings.max_retries,
            )
        return self._client


# --- tools -------------------------------------------------------------------------------

PLATFORM_TOOLS: list[dict[str, Any]] = [
    {
        "name": "report_done",
        "description": "Finish the task successfully. `result`: the answer or a summary of "
        "what was done (what a reviewer reads); `data`: optional structured output.",
        "parameters": {
            "type": "object",
            "properties": {"result": {"type": "string"}, "data": {"type": "object"}},
            "required": ["result"],
            "additionalProperties": False,
        },
    },
    {
        "name": "report_failure",
        "description": "Give up on the task. `retryable`: whether another attempt (maybe on "
        "another agent) could succeed.",
        "parameters": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "retryable": {"type": "boolean"}},
            "required": ["error", "retryable"],
            "additionalProperties": False,
        },
    },
    {
        "name": "request_checkpoint",
        "description": "Ask the group's humans to decide before going on (an irreversible "
        "step, a choice, a draft to approve). Waits for the decision and returns it: "
        "approved (with the chosen option, if any) or changes requested (with their note).",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "description": "The question, short."},
                "details": {"type": "string"},
                "options": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            },
            "required": ["title"],
            "additionalProperties": False,
        },
    },
]
ARTIFACT_TOOL = {
    "name": "write_artifact",
    "description": "Save a text file as an artifact of this task (a new version if the name "
    "exists), for the humans and for later tasks.",
    "parameters": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "content": {"type": "string"},
            "content_type": {"type": "string", "default": "text/plain"},
        },
        "required": ["name", "content"],
        "additionalProperties": False,
    },
}


def function_name(tool: str) -> str:
    """A toolkit tool's name as an OpenAI function name (no dots allowed)."""
    return tool.replace(".", "__")[:64]


def build_tools(toolkits: dict[str, Toolkit], *, artifacts: bool) -> tuple[list[dict], dict]:
    """The `tools` parameter and a map from function name to (kind, tool name)."""
    tools, names = [], {}
    for slug, toolkit in toolkits.items():
        if getattr(toolkit, "runs_tasks", False):
            continue
        for schema in toolkit.schemas():
            name = function_name(schema["name"])
            names[name] = names[schema["name"]] = ("toolkit", schema["name"])
            parameters = schema.get("parameters") or {"type": "object", "properties": {}}
            tools.append(
                {
                    "type": "function",
                    "function": {
                        "name": name,
                        "description": schema.get("description", "")[:1000] or slug,
                        "parameters": parameters,
                    },
                }
            )
    for schema in [*PLATFORM_TOOLS, *([ARTIFACT_TOOL] if artifacts else [])]:
        names[schema["name"]] = ("platform", schema["name"])
        tools.append({"type": "function", "function": schema})
    return tools, names


# --- the loop ----------------------------------------------------------------------------


@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)


@dataclass
class Outcome:
    """How the attempt ended: a report (complete/fail was sent) or a cancellation."""

    status: str  # succeeded, failed, cancelled


Ending = Callable[[], Awaitable[Outcome]]


class ToolResult(Exception):
    """A tool call's error, returned to the model as the call's result."""


def system_prompt(runner: AttemptRunner, tools: dict) -> str:
    toolkit_tools = sorted({name for kind, name in tools.values() if kind == "toolkit"})
    return (
        "You are an AI agent in a Claw Group, a team of humans and agents working on a "
        "shared task graph. You were given one task; do it with the tools you have, then "
        "call report_done with the result (or report_failure if it cannot be done). Your "
        f"tools run on this agent's machine, in the work folder {runner.ctx.workdir}. "
        f"Toolkit tools: {', '.join(toolkit_tools) or 'none'}. Ask the humans with "
        "request_checkpoint before anything irreversible or when the task says so. Keep "
        "going until the task is done; do not stop to ask in plain text."
    ) + skills_prompt(runner.assignment.task)


def skills_prompt(task: protocol.TaskSpec) -> str:
    """The group's skills for the task's toolkits (TaskSpec.skills), for the system prompt."""
    if not task.skills:
        return ""
    parts = [
        "\n\n# Skills\n\nYour group wrote these skills for the toolkits this task "
        "requires. Follow their procedures unless the task says otherwise, go through their "
        "checklists before reporting done, and keep to their constraints: if the task "
        "conflicts with one, ask the humans with request_checkpoint."
    ]
    for slug, text in task.skills.items():
        parts.append(f"## Skill: {slug}\n\n{text.strip()}")
    return "\n\n".join(parts)


def task_prompt(runner: AttemptRunner) -> str:
    task = runner.assignment.task
    parts = [f"Task #{task.id}: {task.title}"]
    if task.instructions:
        parts.append(task.instructions)
    if task.required_toolkits:
        parts.append(f"Required toolkits: {', '.join(task.required_toolkits)}.")
    if task.parent_id:
        parts.append(f"It is part of task #{task.parent_id} (root task #{task.root_id}).")
    for note in runner.feedback:
        parts.append(
            f"A reviewer asked for changes to an earlier result of this task; address them:\n{note}"
        )
    return "\n\n".join(parts)


class LLMLoop:
    def __init__(self, runner: AttemptRunner, toolkit: LLMToolkit, state: dict):
        self.runner = runner
        self.settings = toolkit.settings
        self.client = toolkit.client()
        self.state = state
        artifacts = bool(self.settings.server and self.settings.token)
        self.tools, self.names = build_tools(runner.toolkits, artifacts=artifacts)
        self.messages: list[dict] = [
            {"role": "system", "content": system_prompt(runner, self.names)},
            {"role": "user", "content": task_prompt(runner)},
        ]
        self.turn = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.counted: tuple[int, int] | None = None  # (messages, prompt tokens) last counted

    # --- helpers -------------------------------------------------------------------------

    async def _progress(self, kind: str, data: dict) -> None:
        await self.runner._progress(kind, data, self.state)
        self.runner.journal.save(self.state)

    def _log(self, message: str, *args: Any) -> None:
        self.runner._log(message, *args)

    async def _finish(self, frame: type[protocol.Frame], **fields: Any) -> dict:
        self.runner.finishing = True
        return await self.runner.session.request(frame, **self.runner.ids, **fields)

    async def _complete(self, result: str, data: Any = None) -> Outcome:
        payload: dict[str, Any] = {
            "result": clean(result),
            "turns": self.turn,
            "model": self.settings.model,
            "usage": self.usage,
        }
        if data is not None:
            payload["data"] = data
        if self.runner.feedback:
            payload["feedback"] = self.runner.feedback[-1][:2000]
        await self._finish(protocol.Complete, result=fit(payload, RESULT_BUDGET - 100))
        self._log("succeeded after %d turn(s)", self.turn)
        return Outcome("succeeded")

    async def _fail(self, error: str, retryable: bool) -> Outcome:
        answer = await self._finish(
            protocol.Fail, error=clean(error)[:2000] or "failed", retryable=retryable
        )
        self._log("failed (%s); the task is now %s", error[:200], answer.get("task_status"))
        return Outcome("failed")

    async def _cancelled(self) -> Outcome:
        self._log("stopping: the checkpoint was cancelled (the task was cancelled)")
        return Outcome("cancelled")

    # --- context budget ------------------------------------------------------------------

    def _estimate(self) -> int:
        chars = len(json.dumps(self.tools)) + sum(
            len(json.dumps(m, ensure_ascii=False)) for m in self.messages
        )
        estimate = int(chars / self.settings.chars_per_token)
        if self.counted is not None:
            known, tokens = self.counted
            newer = sum(len(json.dumps(m, ensure_ascii=False)) for m in self.messages[known:])
            estimate = max(estimate, tokens + int(newer / self.settings.chars_per_token))
        return estimate

    def _shorten_tool_outputs(self, limit: int, keep: int) -> bool:
        tool_messages = [m for m in self.messages if m["role"] == "tool"]
        changed = False
        for message in tool_messages[: len(tool_messages) - keep]:
            content = message["content"]
            if len(content) > limit + 200:
                message["content"] = (
                    content[:limit] + f"…[{len(content) - limit} chars of this old tool output "
                    "were dropped to save context]"
                )
                changed = True
        return changed

    def _fit_context(self) -> bool:
        """Shorten old tool outputs (the recent ones last, the latest never), then drop old
        reasoning, until the conversation fits the budget; False when it still does not."""
        budget = self.settings.context_tokens
        if self._estimate() <= budget:
            return True
        stages = [
            (SHORT_OUTPUT_CHARS, KEEP_RECENT_TOOL_OUTPUTS),
            (CUT_OUTPUT_CHARS, KEEP_RECENT_TOOL_OUTPUTS),
            (SHORT_OUTPUT_CHARS, 1),
            (CUT_OUTPUT_CHARS, 1),
        ]
        for limit, keep in stages:
            if self._shorten_tool_outputs(limit, keep):
                self.counted = None  # the server's count no longer applies
                self._log(
                    "context over budget: tool outputs but the last %d cut to %d chars",
                    keep,
                    limit,
                )
            if self._estimate() <= budget:
                return True
        for message in self.messages[2:-2]:
            message.pop("reasoning_content", None)
        self.counted = None
        return self._estimate() <= budget

    # --- one model call ------------------------------------------------------------------

    async def _ask(self) -> Reply:
        options: dict[str, Any] = {}
        if self.settings.temperature is not None:
            options["temperature"] = self.settings.temperature
        if self.settings.extra_body:
            options["extra_body"] = self.settings.extra_body
        stream = await self.client.chat.completions.create(
            model=self.settings.model,
            messages=self.messages,
            tools=self.tools,
            tool_choice="auto",
            max_tokens=self.settings.max_output_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={
                "X-Claw-Attempt": str(self.runner.assignment.attempt_id),
                "X-Claw-Epoch": str(self.runner.assignment.epoch),
            },
            **options,
        )
        reply, content, reasoning, calls = Reply(), [], [], {}
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    reply.usage = chunk.usage.model_dump(exclude_none=True)
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        content.append(delta.content)
                    thought = getattr(delta, "reasoning_content", None)
                    if thought:
                        reasoning.append(thought)
                    for piece in delta.tool_calls or []:
                        call = calls.setdefault(piece.index, {"id": "", "name": "", "args": []})
                        if piece.id:
                            call["id"] = piece.id
                        if piece.function is not None:
                            name = piece.function.name
                            if name and name != call["name"]:
                                call["name"] += name
                            if piece.function.arguments:
                                call["args"].append(piece.function.arguments)
                    if choice.finish_reason:
                        reply.finish_reason = choice.finish_reason
        reply.content, reply.reasoning = "".join(content), "".join(reasoning)
        for index in sorted(calls):
            call = calls[index]
            reply.tool_calls.append(
                {
                    "id": call["id"] or f"call_{self.turn}_{index}",
                    "name": call["name"],
                    "arguments": "".join(call["args"]),
                }
            )
        return reply

    def _record(self, reply: Reply) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or ""}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in reply.tool_calls
            ]
        if reply.usage.get("prompt_tokens"):
            self.counted = (len(self.messages), reply.usage["prompt_tokens"])
        self.messages.append(message)
        for key in self.usage:
            self.usage[key] += int(reply.usage.get(key) or 0)

    # --- running -------------------------------------------------------------------------

    async def _resume_checkpoint(self) -> Outcome | None:
        """The agent restarted while this attempt waited for a decision: wait for that same
        checkpoint (its decision comes with the welcome, or when people make it) instead of
        letting the new conversation ask again, and tell the model what was decided."""
        pending = self.state.get("checkpoint")
        if not pending:
            return None
        output, ending = await self._decision(pending["id"])
        await self._progress("log", {"resumed_checkpoint": output})
        await self.runner.session.confirm_decision(pending["id"])
        if ending is not None:
            return await ending()
        asked = pending.get("title") or f"checkpoint {pending['id']}"
        told = f"Their decision: {output['status']}"
        if output["note"]:
            told += f", with the note: {output['note']}"
        if "instruction" in output:
            told += f". {output['instruction']}"
        self.messages[1]["content"] += (
            f"\n\nBefore a restart of this agent you asked the humans for a decision on "
            f"{asked!r} (checkpoint {pending['id']}). {told}. Do not ask that again; go on "
            "from there."
        )
        return None

    async def run(self) -> str:
        resumed = await self._resume_checkpoint()
        if resumed is not None:
            return resumed.status
        nudged = False
        while True:
            if self.turn >= self.settings.max_turns:
                return (
                    await self._fail(
                        f"stopped after {self.turn} model turns (the step cap) without a result",
                        retryable=False,
                    )
                ).status
            if not self._fit_context():
                return (
                    await self._fail(
                        "the conversation outgrew the context budget "
                        f"({self.settings.context_tokens} tokens)",
                        retryable=False,
                    )
                ).status
            self.turn += 1
            try:
                reply = await self._ask()
            except openai.APIStatusError as exc:
                transient = exc.status_code in (402, 408, 425, 429) or exc.status_code >= 500
                return (
                    await self._fail(
                        f"the model endpoint answered HTTP {exc.status_code}: {exc.message}",
                        retryable=transient,
                    )
                ).status
            except openai.APIConnectionError as exc:
                return (
                    await self._fail(f"the model endpoint failed: {exc}", retryable=True)
                ).status
            self._record(reply)
            await self._progress(
                "log",
                {
                    "turn": self.turn,
                    "reasoning": summarize(reply.reasoning, 2000),
                    "content": summarize(reply.content, 2000),
                    "tool_calls": [call["name"] for call in reply.tool_calls],
                    "usage": reply.usage,
                    "finish_reason": reply.finish_reason,
                },
            )
            if not reply.tool_calls:
                text = reply.content.strip()
                if nudged:
                    if text:
                        return (await self._complete(text)).status
                    return (
                        await self._fail(
                            "the model stopped without a result (no answer, no tool call)",
                            retryable=True,
                        )
                    ).status
                nudged = True
                self.messages.append(
                    {"role": "user", "content": NUDGE_TEXT if text else NUDGE_EMPTY}
                )
                continue
            nudged = False
            for call in reply.tool_calls:
                outcome = await self._call(call)
                if outcome is not None:
                    return outcome.status

    async def _call(self, call: dict) -> Outcome | None:
        """Run one tool call; its result joins the conversation under the call's id. Returns
        an Outcome when the call ended the attempt."""
        name = call["name"]
        kind, tool = self.names.get(name, (None, name))
        data: dict[str, Any] = {"turn": self.turn, "id": call["id"], "tool": tool}
        outcome, output, error = None, None, None
        try:
            try:
                args = json.loads(call["arguments"] or "{}")
            except ValueError as exc:
                raise ToolResult(
                    f"the arguments are not valid JSON ({exc}); call {name} again with a JSON "
                    "object matching its schema"
                ) from None
            if not isinstance(args, dict):
                raise ToolResult("the arguments must be a JSON object")
            data["args"] = summarize(args, 500)
            if kind is None:
                known = sorted({t["function"]["name"] for t in self.tools})
                raise ToolResult(f"there is no tool {name!r}; the tools are {', '.join(known)}")
            if kind == "toolkit":
                output = await self._toolkit(tool, args)
            else:
                output, outcome = await self._platform(tool, args)
        except ToolResult as exc:
            error = str(exc)
        data["ok"] = error is None
        if error is not None:
            data["error"] = error
            content = json.dumps({"error": error}, ensure_ascii=False)
        else:
            data["output"] = summarize(output)
            content = json.dumps(output, ensure_ascii=False, default=str)
        await self._progress("tool_call", data)
        if isinstance(output, dict) and output.get("checkpoint_id"):
            await self.runner.session.confirm_decision(output["checkpoint_id"])
        if outcome is not None:  # the call ends the attempt, once its progress is in
            return await outcome()
        self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        return None

    async def _toolkit(self, tool: str, args: dict) -> dict:
        try:
            toolkit, short = resolve_tool(self.runner.toolkits, tool)
            self._log("turn %d: %s", self.turn, tool)
            output = await toolkit.run(short, args, self.runner.ctx)
        except ToolError as exc:
            detail = {"error": exc.message, "retryable": exc.retryable}
            if exc.output:
                detail["output"] = exc.output
            raise ToolResult(json.dumps(detail, ensure_ascii=False, default=str)) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("tool %s crashed", tool)
            raise ToolResult(f"the tool crashed: {type(exc).__name__}: {exc}") from None
        if not isinstance(output, dict):
            output = {"value": output}
        return json.loads(json.dumps(output, default=str))

    async def _platform(self, tool: str, args: dict) -> tuple[Any, Ending | None]:
        match tool:
            case "report_done":
                result = args.get("result")
                if not isinstance(result, str) or not result.strip():
                    raise ToolResult("report_done needs result: a non-empty string")
                data = args.get("data")
                return {"reported": "done"}, lambda: self._complete(result, data)
            case "report_failure":
                error = args.get("error")
                if not isinstance(error, str) or not error.strip():
                    raise ToolResult("report_failure needs error: a non-empty string")
                retryable = args.get("retryable") is True
                return {"reported": "failure"}, lambda: self._fail(error, retryable)
            case "request_checkpoint":
                return await self._checkpoint(args)
            case "write_artifact":
                return await self._artifact(args), None
        raise ToolResult(f"unknown platform tool {tool!r}")

    async def _checkpoint(self, args: dict) -> tuple[dict, Ending | None]:
        title = args.get("title")
        options = args.get("options") or []
        if not isinstance(title, str) or not title.strip():
            raise ToolResult("request_checkpoint needs title: a non-empty string")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ToolResult("options must be a list of strings")
        session = self.runner.session
        answer = await session.request(
            protocol.CheckpointRequest,
            **self.runner.ids,
            title=clean(title.strip())[:200],
            details=clean(str(args.get("details") or ""))[:20000],
            options=[clean(option)[:100] for option in options[:10]],
        )
        checkpoint_id = answer["checkpoint_id"]
        self.state["checkpoint"] = {"index": -1, "id": checkpoint_id, "title": title.strip()}
        self.runner.journal.save(self.state)
        return await self._decision(checkpoint_id)

    async def _decision(self, checkpoint_id: int) -> tuple[dict, Ending | None]:
        self._log("waiting for a decision on checkpoint %s", checkpoint_id)
        decision = await self.runner.session.wait_decision(checkpoint_id)
        self.state["checkpoint"] = None
        self._log("checkpoint %s: %s", checkpoint_id, decision.status)
        output = {"checkpoint_id": checkpoint_id, "status": decision.status, "note": decision.note}
        note = f": {decision.note}" if decision.note else ""
        match decision.status:
            case "approved":
                return output, None
            case "changes_requested":
                self.runner.feedback.append(decision.note)
                output["instruction"] = (
                    "The humans asked for changes. Make them, then ask again if their "
                    "approval is still needed."
                )
                return output, None
            case "rejected":
                return output, lambda: self._fail(f"checkpoint rejected{note}", retryable=False)
            case "expired":
                return output, lambda: self._fail(
                    "the checkpoint expired without a decision", retryable=False
                )
            case _:  # cancelled: the task was cancelled; stop without writing anything
                return output, self._cancelled

    async def _artifact(self, args: dict) -> dict:
        name, content = args.get("name"), args.get("content")
        content_type = args.get("content_type") or "text/plain"
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ToolResult("name must be a string of 1 to 200 characters")
        if not isinstance(content, str):
            raise ToolResult("content must be a string")
        task = self.runner.assignment.task
        url = f"{self.settings.server.rstrip('/')}/api/v1/tasks/{task.id}/artifacts"
        form = {"name": name.strip(), **{k: str(v) for k, v in self.runner.ids.items()}}
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                response = await http.post(
                    url,
                    headers={"Authorization": f"Bearer {self.settings.token}"},
                    data=form,
                    files={"file": (name.strip(), content.encode(), str(content_type))},
                )
        except httpx.HTTPError as exc:
            raise ToolResult(f"the upload failed: {exc}") from None
        if response.status_code != 201:
            raise ToolResult(
                f"the upload was refused: HTTP {response.status_code} {response.text[:500]}"
            )
        saved = response.json()
        return {k: saved.get(k) for k in ("id", "name", "version", "size", "sha256")}


async def run_llm_loop(runner: AttemptRunner, toolkit: LLMToolkit, state: dict) -> str:
    """Run the attempt's task with the model; returns succeeded, failed or cancelled."""
    runner._log("running with model %s (%s)", toolkit.settings.model, toolkit.settings.base_url)
    return await LLMLoop(runner, toolkit, state).run()
