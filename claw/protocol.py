"""The agent protocol (`/ws/agent/`, version 1): every frame as a pydantic model.

This module is the contract. It imports nothing from Django, so the device runtime and
third-party agents can use it, and docs/protocol.md's JSON schemas are generated from it
(`python -m claw.protocol` prints them).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_FRAME_BYTES = 256 * 1024
MAX_RESULT_BYTES = 128 * 1024

# Close codes (RFC 6455 private range 4000-4999, plus 1009 from the RFC itself).
CLOSE_TOO_BIG = 1009  # a frame exceeded MAX_FRAME_BYTES
CLOSE_UNAUTHORIZED = 4001  # no, unknown or revoked device token at the handshake
CLOSE_REVOKED = 4003  # the device was revoked while connected
CLOSE_PROTOCOL = 4400  # the first frame was not a valid hello, or no common version
CLOSE_REPLACED = 4409  # another connection registered the same agent
CLOSE_RATE_LIMITED = 4429  # kept sending after being told to slow down

ClientId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Slug = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[a-z0-9][a-z0-9_-]*$")]
PositiveId = Annotated[int, Field(ge=1, le=2**62)]
Epoch = Annotated[int, Field(ge=1, le=2**31)]


class Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- agent -> server ---------------------------------------------------------------------


class AgentInfo(Frame):
    name: str = Field(min_length=1, max_length=100)
    toolkits: dict[Slug, Annotated[str, Field(max_length=50)]] = Field(max_length=100)
    tool_schemas: dict[Slug, list[dict[str, Any]]] = Field(default_factory=dict, max_length=100)
    capacity: int = Field(default=1, ge=1, le=256)
    client_version: str = Field(default="", max_length=50)


class Hello(Frame):
    """First frame on every connection."""

    type: Literal["hello"]
    id: ClientId
    versions: list[int] = Field(min_length=1, max_length=10)
    agent: AgentInfo


class Heartbeat(Frame):
    type: Literal["heartbeat"]
    id: ClientId


class Accept(Frame):
    type: Literal["accept"]
    id: ClientId
    attempt_id: PositiveId
    epoch: Epoch


class Decline(Frame):
    type: Literal["decline"]
    id: ClientId
    attempt_id: PositiveId
    epoch: Epoch
    reason: Literal["busy", "missing_tool", "shutting_down", "other"]
    message: str = Field(default="", max_length=1000)


class Progress(Frame):
    type: Literal["progress"]
    id: ClientId
    attempt_id: PositiveId
    epoch: Epoch
    seq: int = Field(ge=1, le=2**31, description="Per-attempt sequence number, from 1.")
    kind: Literal["step", "tool_call", "log", "artifact"]
    data: dict[str, Any] = Field(default_factory=dict)


class Complete(Frame):
    type: Literal["complete"]
    id: ClientId
    attempt_id: PositiveId
    epoch: Epoch
    result: Any = None


class Fail(Frame):
    type: Literal["fail"]
    id: ClientId
    attempt_id: PositiveId
    epoch: Epoch
    error: str = Field(min_length=1, max_length=2000)
    retryable: bool


class CheckpointRequest(Frame):
    type: Literal["checkpoint_request"]
    id: ClientId
    attempt_id: PositiveId
    epoch: Epoch
    title: str = Field(min_length=1, max_length=200)
    details: str = Field(default="", max_length=20000)
    options: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, max_length=10
    )


class DecisionReceived(Frame):
    type: Literal["decision_received"]
    id: ClientId
    checkpoint_id: PositiveId


class Drain(Frame):
    """The agent is shutting down: take no new work; running attempts finish or are failed."""

    type: Literal["drain"]
    id: ClientId


ClientFrame = Annotated[
    Hello
    | Heartbeat
    | Accept
    | Decline
    | Progress
    | Complete
    | Fail
    | CheckpointRequest
    | DecisionReceived
    | Drain,
    Field(discriminator="type"),
]
CLIENT_FRAMES = TypeAdapter(ClientFrame)


# --- server -> agent ---------------------------------------------------------------------


class ServerFrameBase(Frame):
    """Server frames may gain optional fields within a protocol version; an agent ignores
    the ones it does not know (agent frames, in turn, are held to exactly their fields)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TaskSpec(ServerFrameBase):
    id: int
    title: str
    instructions: str
    steps: list[dict[str, Any]]
    required_toolkits: list[str]
    parent_id: int | None
    root_id: int | None
    feedback: str | None = Field(
        default=None,
        description="A reviewer asked for changes to an earlier result of this task: their "
        "note, as new input for this attempt. Sent only when there is one.",
    )
    skills: dict[Slug, str] = Field(
        default_factory=dict,
        max_length=100,
        description="The group's skills for the task's required toolkits, by toolkit slug: "
        "a procedure, checklist and constraints (markdown) for whoever does the task, "
        "e.g. for a model's system prompt. Sent only when there are some.",
    )

    @model_serializer(mode="wrap")
    def _without_empty_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null or empty when there is none, so frames for tasks without
        # feedback or skills stay exactly what agents built before the fields existed accept.
        data = handler(self)
        if data.get("feedback") is None:
            data.pop("feedback", None)
        if not data.get("skills"):
            data.pop("skills", None)
        return data


class Assignment(ServerFrameBase):
    type: Literal["assignment"] = "assignment"
    attempt_id: int
    epoch: int
    status: Literal["offered", "running"]
    deadline: str = Field(description="ISO 8601: accept before this or the offer lapses.")
    task: TaskSpec


class Decision(ServerFrameBase):
    type: Literal["decision"] = "decision"
    checkpoint_id: int
    attempt_id: int | None
    status: Literal["approved", "rejected", "changes_requested", "expired", "cancelled"]
    note: str = ""


class Cancel(ServerFrameBase):
    type: Literal["cancel"] = "cancel"
    attempt_id: int
    epoch: int
    reason: str = ""


class Limits(ServerFrameBase):
    max_frame_bytes: int
    rate_per_s: float
    burst: int


class Welcome(ServerFrameBase):
    type: Literal["welcome"] = "welcome"
    re: str
    version: int
    agent_id: int
    device_id: int
    group: str
    heartbeat_interval_s: int
    lease_timeout_s: int
    limits: Limits
    owned: list[Assignment]
    decisions: list[Decision]


class Ack(ServerFrameBase):
    type: Literal["ack"] = "ack"
    re: str
    result: dict[str, Any] = Field(default_factory=dict)


class Error(ServerFrameBase):
    type: Literal["error"] = "error"
    re: str | None
    code: str
    message: str


ServerFrame = Annotated[
    Welcome | Ack | Error | Assignment | Decision | Cancel, Field(discriminator="type")
]
SERVER_FRAMES = TypeAdapter(ServerFrame)


class FrameError(Exception):
    """An inbound frame that cannot be used; carries the error code and the client id if any."""

    def __init__(self, code: str, message: str, re: str | None = None):
        super().__init__(message)
        self.code, self.message, self.re = code, message, re


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:20]} is out of range")
    return value


def _no_constant(literal: str) -> float:
    raise ValueError(f"{literal} is not JSON")


def _unstorable_string(raw: Any) -> str | None:
    """The first string (key or value) PostgreSQL cannot store: U+0000, or a lone
    surrogate (only a \\u escape makes either, so callers skip texts without one)."""
    stack = [raw]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "U+0000"
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return "an unpaired surrogate"
    return None


def parse_client_frame(text: str) -> ClientFrame:
    """Parse one agent->server text frame or raise FrameError naming the problem.

    Types are checked strictly, as the JSON schemas say: "5" is not an integer and "yes"
    is not a boolean. Text that PostgreSQL cannot store (U+0000, lone surrogates, numbers
    beyond a double) is refused here rather than failing later in the database.
    """
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise FrameError("bad_json", "The frame is not valid UTF-8 text.") from None
    if size > MAX_FRAME_BYTES:
        raise FrameError("too_big", f"Frames are limited to {MAX_FRAME_BYTES} bytes.")
    try:
        raw = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise FrameError("bad_json", "The frame is nested too deeply.") from None
    except ValueError as exc:
        raise FrameError("bad_json", f"The frame is not valid JSON: {exc}"[:200]) from None
    if not isinstance(raw, dict):
        raise FrameError("bad_frame", "A frame is a JSON object.")
    client_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    if client_id is not None and len(client_id) > 64:
        client_id = None
    if "type" not in raw:
        raise FrameError("invalid", "type: missing", client_id)
    if "\\u" in text and (bad := _unstorable_string(raw)):
        raise FrameError("invalid", f"Strings may not contain {bad}.", client_id)
    try:
        return CLIENT_FRAMES.validate_python(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in {"union_tag_invalid", "union_tag_not_found"}:
            raise FrameError(
                "unknown_type", f"Unknown frame type {raw.get('type')!r}."[:200], client_id
            ) from None
        where = ".".join(str(p) for p in first["loc"][1:]) or "frame"
        raise FrameError("invalid", f"{where[:100]}: {first['msg']}", client_id) from None


def json_schemas() -> dict[str, Any]:
    return {
        "agent_to_server": CLIENT_FRAMES.json_schema(),
        "server_to_agent": SERVER_FRAMES.json_schema(),
    }


DOC_START, DOC_END = "<!-- schemas:start -->", "<!-- schemas:end -->"


def doc_with_schemas(doc: str) -> str:
    """docs/protocol.md with its generated schema block brought up to date."""
    head, _, rest = doc.partition(DOC_START)
    _, _, tail = rest.partition(DOC_END)
    block = json.dumps(json_schemas(), indent=2, sort_keys=True)
    return f"{head}{DOC_START}\n```json\n{block}\n```\n{DOC_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:2] == ["--write-doc"]:
        path = Path(sys.argv[2])
        path.write_text(doc_with_schemas(path.read_text()))
    else:
        print(json.dumps(json_schemas(), indent=2, sort_keys=True))
