"""The planner: a goal task → a proposed task graph, approved by humans at a `plan`
checkpoint.

    plan_request (member+) ──on commit──▶ claw.plan_task (Celery) ──▶ plan_generate
        asks the model (claw.llm) for a proposal, validates it, retries once with the
        validation error, then raises a `plan` checkpoint (source planner) carrying the
        proposal (event `plan.proposed`) or records `plan.failed`.
    plan_edit (member+)      replaces a pending plan's proposal, re-validated (event
                             `plan.edited`); with if_match, only if the proposal is still
                             the one the editor started from (proposal_digest).
    approve  → plan_apply    creates the sub-tasks under the goal (task_graph_create, in the
                             decision's transaction); the goal waits for the plan's last
                             tasks (task_dependency_add).
    request changes → plan_replan: the planner is asked again, the note in the prompt.
    reject   → nothing more.

A proposal:

    {"summary": str,
     "tasks": [{"key": "research", "title": str, "instructions": str,
                "required_toolkits": [slug], "depends_on": [key or index],
                "acceptance_criteria": [str]}]}

Structured output: the model is asked with `response_format: json_schema` (the schema
below). SGLang (what serves K2.6 here) enforces it with grammar-constrained decoding
(xgrammar) and, with its reasoning parser, only after the thinking section, so the answer is
the JSON object and nothing else; a forced `submit_plan` tool call would need
`tool_choice` other than "auto", which thinking models serve less reliably. The output is
validated here all the same (the backend may not enforce the schema, or may cut it short).
"""

import hashlib
import json
from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from apps.devices.models import Agent, Toolkit
from apps.events.models import Event
from apps.events.services import event_append
from apps.groups.models import Role
from apps.groups.selectors import require_role
from apps.llm.services import group_complete_validated
from apps.tasks.models import TERMINAL_TASK_STATUSES, Task, TaskStatus
from claw import llm
from claw.errors import InvalidInput, InvalidTransition

MAX_TASKS = 50
MAX_TITLE = 200
MAX_INSTRUCTIONS = 20_000
MAX_SUMMARY = 5_000
MAX_CRITERIA = 20
MAX_CRITERION = 500
MAX_TOOLKITS_PER_TASK = 20
MAX_KEY = 40
# A plan request with no outcome after this long counts as lost: a new one may be made.
REQUEST_STALE_AFTER = timedelta(minutes=20)
MODEL_MAX_TOKENS = 32_000
KEY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def plan_schema(toolkits: list[str]) -> dict:
    """The JSON schema of a proposal, its toolkits limited to `toolkits`."""
    task = {
        "type": "object",
        "properties": {
            "key": {
                "type": "string",
                "description": "Short unique id, lowercase letters, digits, - and _.",
            },
            "title": {"type": "string", "description": f"At most {MAX_TITLE} characters."},
            "instructions": {
                "type": "string",
                "description": "What to do, for an agent that sees only this task.",
            },
            "required_toolkits": {
                "type": "array",
                "items": {"type": "string", "enum": toolkits},
            },
            "depends_on": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Keys of tasks that must finish first.",
            },
            "acceptance_criteria": {"type": "array", "items": {"type": "string"}},
        },
        "required": [
            "key",
            "title",
            "instructions",
            "required_toolkits",
            "depends_on",
            "acceptance_criteria",
        ],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "tasks": {"type": "array", "items": task, "minItems": 1, "maxItems": MAX_TASKS},
        },
        "required": ["summary", "tasks"],
        "additionalProperties": False,
    }


# --- validation --------------------------------------------------------------------------


def _text(value, where: str, *, limit: int, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be a string.", code="invalid_plan")
    value = value.strip()
    if required and not value:
        raise InvalidInput(f"{where} must not be empty.", code="invalid_plan")
    if len(value) > limit:
        raise InvalidInput(f"{where} is longer than {limit} characters.", code="invalid_plan")
    return value


def plan_validate(proposal, *, toolkits: set[str]) -> dict:
    """The proposal, checked and normalized (dependencies as keys, keys filled in), or
    InvalidInput (code invalid_plan, or unknown_toolkit / dependency_cycle) saying what is
    wrong, in words the model can act on."""
    if not isinstance(proposal, dict):
        raise InvalidInput("The plan must be a JSON object.", code="invalid_plan")
    unknown_fields = sorted(set(proposal) - {"summary", "tasks"})
    if unknown_fields:
        raise InvalidInput(
            f"Unknown plan field(s): {', '.join(unknown_fields)}.", code="invalid_plan"
        )
    summary = _text(proposal.get("summary"), "summary", limit=MAX_SUMMARY, required=False)
    raw_tasks = proposal.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise InvalidInput("tasks must be a non-empty list.", code="invalid_plan")
    if len(raw_tasks) > MAX_TASKS:
        raise InvalidInput(
            f"A plan has at most {MAX_TASKS} tasks (this one has {len(raw_tasks)}).",
            code="invalid_plan",
        )
    allowed = {
        "key",
        "title",
        "instructions",
        "required_toolkits",
        "depends_on",
        "acceptance_criteria",
    }
    tasks, keys = [], []
    for index, raw in enumerate(raw_tasks):
        where = f"tasks[{index}]"
        if not isinstance(raw, dict):
            raise InvalidInput(f"{where} must be an object.", code="invalid_plan")
        extra = sorted(set(raw) - allowed)
        if extra:
            raise InvalidInput(
                f"{where}: unknown field(s) {', '.join(extra)}.", code="invalid_plan"
            )
        key = raw.get("key")
        key = f"t{index + 1}" if key in (None, "") else _text(key, f"{where}.key", limit=MAX_KEY)
        key = key.lower()
        if not set(key) <= KEY_CHARS:
            raise InvalidInput(
                f"{where}.key {key!r}: use lowercase letters, digits, - and _.",
                code="invalid_plan",
            )
        if key in keys:
            raise InvalidInput(f"{where}.key {key!r} is used twice.", code="invalid_plan")
        keys.append(key)
        slugs = raw.get("required_toolkits") or []
        if not isinstance(slugs, list) or not all(isinstance(s, str) for s in slugs):
            raise InvalidInput(
                f"{where}.required_toolkits must be a list of strings.", code="invalid_plan"
            )
        slugs = sorted(set(slugs))
        if len(slugs) > MAX_TOOLKITS_PER_TASK:
            raise InvalidInput(f"{where}: too many toolkits.", code="invalid_plan")
        unknown = [slug for slug in slugs if slug not in toolkits]
        if unknown:
            raise InvalidInput(
                f"{where} ({key}) requires unknown toolkit(s) {', '.join(unknown)}; "
                f"available: {', '.join(sorted(toolkits))}.",
                code="unknown_toolkit",
                details={"unknown": unknown},
            )
        criteria = raw.get("acceptance_criteria") or []
        if not isinstance(criteria, list) or len(criteria) > MAX_CRITERIA:
            raise InvalidInput(
                f"{where}.acceptance_criteria must be a list of at most {MAX_CRITERIA} strings.",
                code="invalid_plan",
            )
        deps = raw.get("depends_on") or []
        if not isinstance(deps, list) or len(deps) > MAX_TASKS:
            raise InvalidInput(f"{where}.depends_on must be a list.", code="invalid_plan")
        tasks.append(
            {
                "key": key,
                "title": _text(raw.get("title"), f"{where}.title", limit=MAX_TITLE),
                "instructions": _text(
                    raw.get("instructions"),
                    f"{where}.instructions",
                    limit=MAX_INSTRUCTIONS,
                    required=False,
                ),
                "required_toolkits": slugs,
                "depends_on": deps,
                "acceptance_criteria": [
                    _text(c, f"{where}.acceptance_criteria[{i}]", limit=MAX_CRITERION)
                    for i, c in enumerate(criteria)
                ],
            }
        )
    # Dependencies by key, or by index into tasks.
    for index, task in enumerate(tasks):
        resolved = []
        for dep in task["depends_on"]:
            if isinstance(dep, int) and not isinstance(dep, bool) and 0 <= dep < len(tasks):
                dep = keys[dep]
            elif isinstance(dep, str) and dep.strip().lower() in keys:
                dep = dep.strip().lower()
            else:
                raise InvalidInput(
                    f"tasks[{index}] ({task['key']}) depends on {dep!r}, which is not a task "
                    f"of this plan; use the keys {', '.join(keys)}.",
                    code="invalid_plan",
                )
            if dep == task["key"]:
                raise InvalidInput(
                    f"tasks[{index}] ({task['key']}) depends on itself.", code="dependency_cycle"
                )
            if dep not in resolved:
                resolved.append(dep)
        task["depends_on"] = resolved
    _topological_order(tasks)  # raises on a cycle
    return {"summary": summary, "tasks": tasks}


def _topological_order(tasks: list[dict]) -> list[dict]:
    """Tasks with each after its dependencies (stable); InvalidInput on a cycle."""
    by_key = {task["key"]: task for task in tasks}
    waiting = {task["key"]: set(task["depends_on"]) for task in tasks}
    order: list[dict] = []
    while waiting:
        free = [key for key in by_key if key in waiting and not waiting[key]]
        if not free:
            cycle = sorted(waiting)
            raise InvalidInput(
                f"The dependencies make a cycle among: {', '.join(cycle)}.",
                code="dependency_cycle",
                details={"tasks": cycle},
            )
        for key in free:
            order.append(by_key[key])
            del waiting[key]
        for deps in waiting.values():
            deps.difference_update(free)
    return order


def known_toolkits() -> set[str]:
    return set(Toolkit.objects.values_list("slug", flat=True))


def planner_toolkits(group_id: int) -> list[str]:
    """What the planner may use: the toolkits the group's agents declare (and the registry
    knows), plus `llm` (natural-language work for agents that run a model)."""
    declared = {"llm"}
    for toolkits in Agent.objects.filter(group_id=group_id).values_list("toolkits", flat=True):
        declared.update(toolkits or {})
    return sorted(declared & known_toolkits())


# --- requesting a plan -------------------------------------------------------------------


def _outcome_kinds() -> list[str]:
    return ["plan.proposed", "plan.failed"]


def _request_open(task: Task) -> bool:
    """A plan request on this task that has no outcome yet and is not stale."""
    latest = (
        Event.objects.filter(task_id=task.id, kind__in=["plan.requested", *_outcome_kinds()])
        .order_by("-seq")
        .only("kind", "created_at")
        .first()
    )
    return (
        latest is not None
        and latest.kind == "plan.requested"
        and latest.created_at > timezone.now() - REQUEST_STALE_AFTER
    )


def _pending_plan(task_id: int):
    from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointStatus

    return Checkpoint.objects.filter(
        task_id=task_id, kind=CheckpointKind.PLAN, status=CheckpointStatus.PENDING
    ).first()


def _enqueue(task: Task, *, actor_id: int | None, feedback: str = "") -> Event:
    from apps.tasks.tasks import plan_task

    payload = {"feedback": feedback} if feedback else {}
    event = event_append(
        group_id=task.group_id,
        kind="plan.requested",
        task_id=task.id,
        actor_id=actor_id,
        payload=payload,
    )
    event_id = event.id
    transaction.on_commit(lambda: plan_task.delay(task.id, event_id), robust=True)
    return event


def plan_request(*, actor: AbstractBaseUser, task: Task) -> Event:
    """Ask the model to break this goal task down (member+). Returns the `plan.requested`
    event; its id is the request's id. Refused while a plan for the task is pending or being
    made, for finished tasks, and without a model (503 model_unavailable)."""
    require_role(user=actor, group_id=task.group_id, role=Role.MEMBER)
    if not llm.configured():
        raise llm.ModelUnavailable(
            "Planning needs a model: no model backend is configured (set CLAW_LLM_BASE_URL)."
        )
    with transaction.atomic():
        current = Task.objects.select_for_update(no_key=True).get(id=task.id)
        if current.status in TERMINAL_TASK_STATUSES:
            raise InvalidTransition(f"Task {task.id} is {current.status}: nothing to plan.")
        if _pending_plan(task.id) is not None:
            raise InvalidTransition(
                "A plan for this task waits for a decision; decide on it first.",
                code="plan_pending",
            )
        if _request_open(current):
            raise InvalidTransition("A plan for this task is being made.", code="plan_in_progress")
        return _enqueue(current, actor_id=actor.pk)


def plan_replan(*, checkpoint, note: str, actor: AbstractBaseUser | None) -> None:
    """Changes were requested on a plan: ask the planner again with the note (inside the
    decision's transaction; the new request is enqueued on commit)."""
    if not llm.configured():
        raise llm.ModelUnavailable(
            "Asking for a new plan needs a model; edit the plan or reject it instead."
        )
    task = Task.objects.get(id=checkpoint.task_id)
    previous = json.dumps(checkpoint.proposal, ensure_ascii=False)
    feedback = f"Your previous plan:\n{previous[:20000]}\n\nThe humans asked for changes:\n{note}"
    _enqueue(task, actor_id=actor.pk if actor is not None else None, feedback=feedback)


# --- making a plan (the Celery task's body) ----------------------------------------------

SYSTEM_PROMPT = """You are the planner of a Claw Group: humans and AI agents working on a \
shared task graph. Break the goal below into sub-tasks that agents can run on their own.

Rules:
- Each task is done by one agent that sees only that task's title and instructions (and \
the artifacts of the task tree), so make the instructions self-contained and concrete.
- required_toolkits: only from this list: {toolkits}. Use "llm" for tasks an AI agent \
does from natural-language instructions; add the other toolkits the work needs.
- depends_on: the keys of tasks whose results this task needs. No cycles. Tasks without \
dependencies between them run in parallel.
- acceptance_criteria: short, checkable statements of what done means.
- At most {max_tasks} tasks; prefer few, meaningful tasks over many tiny ones.
- Answer with the JSON object only, matching the schema."""


def _goal_prompt(task: Task, feedback: str) -> str:
    parts = [f"Goal (task #{task.id}): {task.title}"]
    if task.instructions:
        parts.append(f"Details:\n{task.instructions[:MAX_INSTRUCTIONS]}")
    if task.required_toolkits:
        parts.append(f"The goal requires toolkits: {', '.join(task.required_toolkits)}")
    if feedback:
        parts.append(feedback)
    return "\n\n".join(parts)


def _finished(task_id: int, request_id: int) -> bool:
    return Event.objects.filter(
        task_id=task_id, kind__in=_outcome_kinds(), payload__request_id=request_id
    ).exists()


def plan_generate(*, task_id: int, request_id: int) -> str:
    """Make the plan for one `plan.requested` event: idempotent (a request with an outcome
    is not made again). Returns "proposed", "failed" or "skipped"."""
    if _finished(task_id, request_id):
        return "skipped"
    task = Task.objects.select_related("group").filter(id=task_id).first()
    request = Event.objects.filter(id=request_id, task_id=task_id).first()
    if task is None or request is None:
        return "skipped"
    toolkits = planner_toolkits(task.group_id)
    messages = [
        {
            "role": "system",
            "content": SYSTEM_PROMPT.format(toolkits=", ".join(toolkits), max_tasks=MAX_TASKS),
        },
        {"role": "user", "content": _goal_prompt(task, request.payload.get("feedback", ""))},
    ]
    proposal, error, usage = group_complete_validated(
        group_id=task.group_id,
        task_id=task.id,
        messages=messages,
        name="plan",
        schema=plan_schema(toolkits),
        max_tokens=MODEL_MAX_TOKENS,
        validate=lambda answer: plan_validate(answer, toolkits=set(toolkits)),
        what="the plan's JSON object",
    )
    return _record(task, request_id, proposal=proposal, error=error, usage=usage)


def _record(task: Task, request_id: int, *, proposal, error: str, usage: list[dict]) -> str:
    from apps.checkpoints.models import CheckpointKind, CheckpointSource
    from apps.checkpoints.services import checkpoint_raise

    with transaction.atomic():
        current = Task.objects.select_for_update(no_key=True).get(id=task.id)
        if _finished(task.id, request_id):  # another worker got there first
            return "skipped"
        base = {"request_id": request_id, "usage": usage}
        if proposal is not None and current.status in TERMINAL_TASK_STATUSES:
            proposal, error = None, f"the task is {current.status} now"
        if proposal is None:
            event_append(
                group_id=task.group_id,
                kind="plan.failed",
                task_id=task.id,
                payload={**base, "error": error or "no valid plan"},
            )
            return "failed"
        checkpoint = checkpoint_raise(
            group=task.group,
            task=current,
            source=CheckpointSource.PLANNER,
            kind=CheckpointKind.PLAN,
            title=f"Plan for task #{task.id}: {task.title}"[:200],
            details=proposal["summary"][:MAX_SUMMARY],
            proposal=proposal,
        )
        event_append(
            group_id=task.group_id,
            kind="plan.proposed",
            task_id=task.id,
            payload={**base, "checkpoint_id": checkpoint.id, "tasks": len(proposal["tasks"])},
        )
    return "proposed"


# --- editing and applying ----------------------------------------------------------------


def proposal_digest(proposal) -> str:
    """A short fingerprint of a proposal (key order does not matter): an editor sends the
    one it started from as plan_edit's if_match."""
    raw = json.dumps(proposal, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def plan_edit(
    *, actor: AbstractBaseUser, checkpoint, proposal, if_match: str | None = None
) -> None:
    """Replace a pending plan's proposal (member+), validated against the toolkit registry.
    Refused once someone decided on it (their decision was about the old plan), and, with
    if_match (a proposal_digest), when someone else edited it since (plan_changed)."""
    from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointStatus

    require_role(user=actor, group_id=checkpoint.group_id, role=Role.MEMBER)
    if checkpoint.kind != CheckpointKind.PLAN:
        raise InvalidInput("Only a plan checkpoint has a proposal to edit.", code="not_a_plan")
    normalized = plan_validate(proposal, toolkits=known_toolkits())
    with transaction.atomic():
        if checkpoint.task_id is not None:
            list(Task.objects.select_for_update(no_key=True).filter(id=checkpoint.task_id))
        current = Checkpoint.objects.select_for_update().get(id=checkpoint.id)
        if current.status != CheckpointStatus.PENDING:
            raise InvalidTransition(
                f"This plan is already {current.status}.", code="already_resolved"
            )
        if current.decisions.exists():
            raise InvalidTransition(
                "Someone already decided on this plan; it can no longer be edited.",
                code="plan_decided",
            )
        if if_match is not None and proposal_digest(current.proposal) != if_match:
            raise InvalidTransition(
                "Someone else edited this plan meanwhile.",
                code="plan_changed",
                details={"digest": proposal_digest(current.proposal)},
            )
        Checkpoint.objects.filter(id=current.id).update(
            proposal=normalized, details=normalized["summary"][:MAX_SUMMARY]
        )
        event_append(
            group_id=current.group_id,
            kind="plan.edited",
            task_id=current.task_id,
            actor_id=actor.pk,
            payload={"checkpoint_id": current.id, "tasks": len(normalized["tasks"])},
        )
    checkpoint.proposal = normalized


def _instructions(item: dict) -> str:
    text = item["instructions"]
    if item["acceptance_criteria"]:
        criteria = "\n".join(f"- {c}" for c in item["acceptance_criteria"])
        text = f"{text}\n\nAcceptance criteria:\n{criteria}".strip()
    return text


def plan_apply(*, checkpoint, actor: AbstractBaseUser) -> list[int]:
    """An approved plan: its tasks become children of the goal, with their dependencies,
    through task_graph_create (inside the decision's transaction, so all or nothing). The
    goal then depends on the plan's last tasks (those nothing else depends on), so it is
    ready only once the plan's work is done. Returns the new task ids in plan order."""
    from apps.tasks.graphs import GraphTask, task_graph_create
    from apps.tasks.services import task_dependency_add

    goal = Task.objects.select_related("group").get(id=checkpoint.task_id)
    if goal.status in TERMINAL_TASK_STATUSES:
        raise InvalidTransition(f"The goal task is {goal.status}; the plan cannot be applied.")
    proposal = plan_validate(checkpoint.proposal, toolkits=known_toolkits())
    created = task_graph_create(
        group=goal.group,
        actor=actor,
        tasks=[
            GraphTask(
                key=item["key"],
                title=item["title"],
                instructions=_instructions(item),
                required_toolkits=item["required_toolkits"],
                parent_id=goal.id,
                depends_on=item["depends_on"],
            )
            for item in proposal["tasks"]
        ],
    )
    ids = {key: task.id for key, task in created.items()}
    needed = {dep for item in proposal["tasks"] for dep in item["depends_on"]}
    last = [ids[item["key"]] for item in proposal["tasks"] if item["key"] not in needed]
    goal.refresh_from_db(fields=["status"])
    if goal.status in (TaskStatus.WAITING, TaskStatus.READY, TaskStatus.BLOCKED):
        for task in Task.objects.filter(id__in=last).order_by("id"):
            task_dependency_add(actor=actor, task=goal, depends_on=task)
    event_append(
        group_id=goal.group_id,
        kind="plan.applied",
        task_id=goal.id,
        actor_id=actor.pk,
        payload={"checkpoint_id": checkpoint.id, "tasks": ids},
    )
    return list(ids.values())
