"""Plan review: a plan checkpoint's proposal (apps.tasks.planner) shown where people decide
on it — the approvals inbox and the goal task's page — and edited there.

The block (templates/dashboard/_plan_proposal.html, root id `plan-<checkpoint id>`) lists
the summary and the proposed tasks. People plan_edit allows (member+, while the plan is
pending and nobody decided on it yet) get an "Edit plan" form that posts to
`checkpoint_plan`:

- with htmx, the answer is the block again, swapped in place: the edited plan, or the form
  as typed with the error next to it (status 200 either way, so that htmx swaps it);
- without JavaScript, a saved edit redirects back (`next`); a refused one shows the plan
  page with the form as typed (422; 409 when the plan was edited meanwhile) or, when the
  plan was decided meanwhile, goes back with the message.

Live pages redraw the block on `plan.edited` and checkpoint events; in those fragments the
editor carries hx-preserve, so a redraw never takes away what someone is typing. The form
names the proposal it started from (plan_edit's if_match): saving over someone else's edit
is refused once, with the typed values kept, and saving again replaces theirs.
"""

import re
from dataclasses import dataclass, field

from django.contrib import messages
from django.db.models import Exists, OuterRef
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointStatus, Decision
from apps.checkpoints.selectors import checkpoint_get_for_user
from apps.dashboard.access import back, dashboard_view
from apps.groups.models import Group, Membership, Role
from apps.groups.selectors import group_with_role_for_user
from apps.tasks.models import Task
from apps.tasks.planner import MAX_TASKS, known_toolkits, plan_edit, proposal_digest
from claw.errors import DomainError, Forbidden, NotFound

EDITOR_ROLE = Role.MEMBER  # plan_edit's own rule (it checks; the form is only hidden)
MAX_ROWS = 2 * MAX_TASKS  # the editor shows at most MAX_TASKS + 1; more is a forged form
STALE_CODES = ("already_resolved", "plan_decided")
ROW_FIELDS = ("key", "title", "instructions", "toolkits", "depends_on", "criteria")


@dataclass
class PlanBlock:
    """What _plan_proposal.html shows for one plan checkpoint."""

    id: int
    status: str
    summary: str
    tasks: list[dict]
    url: str
    next_url: str
    editable: bool = False
    locked: str = ""  # why a member cannot edit a pending plan
    may_decide: bool = False  # pending, and the role reaches its decider role
    digest: str = ""
    toolkits: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    error: str = ""
    notice: str = ""
    notice_error: bool = False
    open: bool = False

    @property
    def pending(self) -> bool:
        return self.status == CheckpointStatus.PENDING

    @property
    def status_label(self) -> str:
        return self.status.replace("_", " ")


def plan_url(*, slug: str, checkpoint_id: int) -> str:
    return reverse(
        "dashboard:checkpoint_plan", kwargs={"slug": slug, "checkpoint_id": checkpoint_id}
    )


def _tasks(proposal: object) -> list[dict]:
    items = proposal.get("tasks") if isinstance(proposal, dict) else None
    return [t for t in items if isinstance(t, dict)] if isinstance(items, list) else []


def _joined(values: object, separator: str) -> str:
    return separator.join(str(v) for v in values) if isinstance(values, list) else ""


def _blank_row(n: int) -> dict:
    return {"n": n, "blank": True, "remove": False, "error": False} | dict.fromkeys(ROW_FIELDS, "")


def rows_for(tasks: list[dict]) -> list[dict]:
    """The editor's rows for a proposal's tasks, and one blank row to add a task."""
    rows = [
        {
            "n": n,
            "blank": False,
            "remove": False,
            "error": False,
            "key": str(task.get("key") or ""),
            "title": str(task.get("title") or ""),
            "instructions": str(task.get("instructions") or ""),
            "toolkits": _joined(task.get("required_toolkits"), ", "),
            "depends_on": _joined(task.get("depends_on"), ", "),
            "criteria": _joined(task.get("acceptance_criteria"), "\n"),
        }
        for n, task in enumerate(tasks)
    ]
    return [*rows, _blank_row(len(rows))]


def plan_block(
    checkpoint: Checkpoint,
    *,
    slug: str,
    role: str | None,
    decided: bool,
    next_url: str,
    toolkits: list[str] | None = None,
) -> PlanBlock:
    """The block for a plan checkpoint as `role` sees it; `decided`: someone decided on it."""
    proposal = checkpoint.proposal if isinstance(checkpoint.proposal, dict) else {}
    tasks = _tasks(proposal)
    may_edit = role is not None and Role.rank(role) >= Role.rank(EDITOR_ROLE)
    pending = checkpoint.status == CheckpointStatus.PENDING
    block = PlanBlock(
        id=checkpoint.id,
        status=checkpoint.status,
        summary=str(proposal.get("summary") or ""),
        tasks=tasks,
        url=plan_url(slug=slug, checkpoint_id=checkpoint.id),
        next_url=next_url,
        editable=may_edit and pending and not decided,
        may_decide=pending
        and role is not None
        and Role.rank(role) >= Role.rank(checkpoint.decider_role),
    )
    if may_edit and pending and decided:
        block.locked = "Someone already approved this plan, so it can no longer be edited."
    if block.editable:
        block.digest = proposal_digest(checkpoint.proposal)
        block.toolkits = toolkits if toolkits is not None else sorted(known_toolkits())
        block.rows = rows_for(tasks)
    return block


def plan_html(block: PlanBlock, request: HttpRequest | None = None, **context) -> str:
    return render_to_string(
        "dashboard/_plan_proposal.html", {"plan": block, **context}, request=request
    )


# --- where the block is shown ------------------------------------------------------------


def approvals_plan_blocks(*, user, checkpoints: list[Checkpoint]) -> None:
    """Attach `plan` to the inbox's plan checkpoints (annotated with `approvals`): two
    queries however many there are."""
    plans = [c for c in checkpoints if c.kind == CheckpointKind.PLAN]
    if not plans:
        return
    roles = dict(
        Membership.objects.filter(
            user_id=user.pk, group_id__in={c.group_id for c in plans}
        ).values_list("group_id", "role")
    )
    toolkits = sorted(known_toolkits())
    next_url = reverse("dashboard:approvals")
    for checkpoint in plans:
        checkpoint.plan = plan_block(
            checkpoint,
            slug=checkpoint.group.slug,
            role=roles.get(checkpoint.group_id),
            decided=checkpoint.approvals > 0,
            next_url=next_url,
            toolkits=toolkits,
        )


def task_plan_block(*, task: Task, group: Group, role: str, next_url: str) -> PlanBlock | None:
    """The task's latest plan checkpoint (pending or decided), or None: one query, two when
    it may be edited."""
    checkpoint = (
        Checkpoint.objects.filter(task_id=task.id, kind=CheckpointKind.PLAN)
        .annotate(decided=Exists(Decision.objects.filter(checkpoint_id=OuterRef("id"))))
        .order_by("-created_at", "-id")
        .first()
    )
    if checkpoint is None:
        return None
    return plan_block(
        checkpoint, slug=group.slug, role=role, decided=checkpoint.decided, next_url=next_url
    )


# --- reading the editor's form -----------------------------------------------------------


def _items(text: str) -> list[str]:
    """Comma or space separated values."""
    return [item for item in re.split(r"[\s,]+", text.strip()) if item]


def rows_from_post(data) -> list[dict]:
    """The editor's rows as typed (at most MAX_ROWS), ending with one blank row."""
    try:
        count = max(0, min(int(data.get("rows", "0")), MAX_ROWS))
    except ValueError:
        count = 0
    rows = []
    for n in range(count):
        row = {
            name: str(data.get(f"task-{n}-{name}", "")).replace("\r\n", "\n") for name in ROW_FIELDS
        }
        row["key"] = row["key"].strip()
        row.update(
            n=n,
            remove=data.get(f"task-{n}-remove") == "1",
            error=False,
            blank=not any(row[name].strip() for name in ROW_FIELDS),
        )
        rows.append(row)
    if not rows or not rows[-1]["blank"]:
        rows.append(_blank_row(len(rows)))
    return rows


def proposal_from_rows(summary: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """The proposal the rows describe (removed and blank rows left out; a task without a
    key gets a fresh one), and the rows of its tasks in order."""
    kept = [row for row in rows if not row["remove"] and not row["blank"]]
    used = {row["key"].lower() for row in kept if row["key"]}
    number = 0
    tasks = []
    for row in kept:
        key = row["key"]
        if not key:
            number += 1
            while f"t{number}" in used:
                number += 1
            key = f"t{number}"
            used.add(key)
        row["effective_key"] = key.lower()
        tasks.append(
            {
                "key": key,
                "title": row["title"],
                "instructions": row["instructions"],
                "required_toolkits": _items(row["toolkits"]),
                "depends_on": _items(row["depends_on"]),
                "acceptance_criteria": [
                    line.strip() for line in row["criteria"].splitlines() if line.strip()
                ],
            }
        )
    return {"summary": summary, "tasks": tasks}, kept


def _error_text(error: DomainError, kept: list[dict]) -> str:
    """plan_validate's message in the editor's words: `tasks[i].field` becomes the row's
    "Task N field" (N as its legend shows it)."""
    if error.message.startswith("tasks must be a non-empty list"):
        return "A plan needs at least one task; to drop the plan, reject it instead."

    def row_name(match: re.Match) -> str:
        index = int(match.group(1))
        name = f"Task {kept[index]['n'] + 1}" if index < len(kept) else f"Task {index + 1}"
        return f"{name} {match.group(2)}" if match.group(2) else name

    return re.sub(r"tasks\[(\d+)\](?:\.(\w+))?", row_name, error.message)


def _mark_error_rows(error: DomainError, kept: list[dict], rows: list[dict]) -> None:
    """Flag the rows an error names: `tasks[i]` in its message, or a cycle's keys."""
    for index in re.findall(r"tasks\[(\d+)\]", error.message):
        if int(index) < len(kept):
            kept[int(index)]["error"] = True
    keys = error.details.get("tasks") if isinstance(error.details, dict) else None
    if isinstance(keys, list):
        for row in rows:
            if row.get("effective_key") in keys:
                row["error"] = True


# --- the view ----------------------------------------------------------------------------


def _plan_in_group(request: HttpRequest, slug: str, checkpoint_id: int):
    group = group_with_role_for_user(user=request.user, slug=slug)
    checkpoint = checkpoint_get_for_user(user=request.user, checkpoint_id=checkpoint_id)
    if checkpoint.group_id != group.id or checkpoint.kind != CheckpointKind.PLAN:
        raise NotFound("No such plan in this group.")
    return group, checkpoint


def _page(request: HttpRequest, group: Group, checkpoint: Checkpoint, block: PlanBlock, status=200):
    task = Task.objects.filter(id=checkpoint.task_id).values("id", "title").first()
    return render(
        request,
        "dashboard/plan_review.html",
        {"group": group, "checkpoint": checkpoint, "task": task, "plan": block},
        status=status,
    )


@dashboard_view
@require_http_methods(["GET", "POST"])
def checkpoint_plan(request: HttpRequest, slug: str, checkpoint_id: int) -> HttpResponse:
    """GET: the plan page (any member of the group). POST: save the editor (plan_edit)."""
    group, checkpoint = _plan_in_group(request, slug, checkpoint_id)
    page_url = plan_url(slug=group.slug, checkpoint_id=checkpoint.id)

    def block_for(current: Checkpoint, next_url: str) -> PlanBlock:
        return plan_block(
            current,
            slug=group.slug,
            role=group.role,
            decided=current.decisions.exists(),
            next_url=next_url,
        )

    if request.method == "GET":
        return _page(request, group, checkpoint, block_for(checkpoint, page_url))
    htmx = request.headers.get("HX-Request") == "true"
    next_url = request.POST.get("next", "") or page_url
    rows = rows_from_post(request.POST)
    summary = request.POST.get("summary", "").replace("\r\n", "\n")
    proposal, kept = proposal_from_rows(summary, rows)
    try:
        plan_edit(
            actor=request.user,
            checkpoint=checkpoint,
            proposal=proposal,
            if_match=request.POST.get("if_match") or None,
        )
    except (NotFound, Forbidden):
        raise
    except DomainError as error:
        current = Checkpoint.objects.filter(id=checkpoint.id).first()
        if current is None:
            raise NotFound("No such plan in this group.") from None
        block = block_for(current, next_url)
        if error.code in STALE_CODES or not block.editable:
            reason = error.message
            if error.code not in STALE_CODES:
                reason = block.locked or f"This plan is already {current.status}."
            message = f"{reason} Your changes were not saved."
            if not htmx:
                messages.error(request, message)
                return back(request, page_url)
            block.notice, block.notice_error = message, True
            return HttpResponse(plan_html(block, request))
        if error.code == "plan_changed":
            block.error = (
                "Someone else edited this plan meanwhile (shown above). Your version is kept "
                "below: saving it again replaces theirs."
            )
        else:
            block.error = _error_text(error, kept)
            _mark_error_rows(error, kept, rows)
        block.rows, block.open = rows, True
        if htmx:
            return HttpResponse(plan_html(block, request))
        return _page(request, group, current, block, status=error.status)
    count = len(checkpoint.proposal["tasks"])
    saved = f"Saved the plan: {count} task{'' if count == 1 else 's'}."
    if not htmx:
        messages.success(request, saved)
        return back(request, page_url)
    block = block_for(checkpoint, next_url)
    block.notice = saved
    return HttpResponse(plan_html(block, request))
