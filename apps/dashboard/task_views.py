"""Dashboard pages: the task board, task creation and task detail, and their live renderers
("board", "task"; see apps.dashboard.live for the contract).

Every page reads a bounded amount whatever the group's size: the board shows the newest
COLUMN_CAP cards per status (one windowed query) and links to a paged list for the rest;
the task page draws at most GRAPH_MAX_NODES of its tree and the last EVENTS_SHOWN events.
Query counts do not grow with the number of tasks or events (tests/test_dashboard_tasks.py
pins them)."""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.db.models import Count, F, Q, Window
from django.db.models.functions import RowNumber
from django.http import Http404, HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_POST

from apps.dashboard.access import REFUSED, back, dashboard_view, perform
from apps.dashboard.graph import Edge, Layout, Node, layout
from apps.dashboard.live import LiveContext, live_context, live_page
from apps.dashboard.plan_views import task_plan_block
from apps.dashboard.previews import artifact_preview
from apps.devices.models import Agent, Device, Toolkit
from apps.events.models import Event
from apps.groups.models import CheckpointPolicy, DependencyFailurePolicy, Group, Role
from apps.groups.selectors import require_role
from apps.tasks.downloads import artifact_file_response
from apps.tasks.models import (
    TERMINAL_TASK_STATUSES,
    Artifact,
    Attempt,
    AttemptStatus,
    Task,
    TaskDependency,
    TaskStatus,
)
from apps.tasks.selectors import artifacts_for_task, task_get_for_user, tasks_for_group
from apps.tasks.services import task_cancel, task_create, task_retry
from claw import llm
from claw.errors import DomainError, Forbidden, NotFound
from claw.schema import DB_INT_MAX

# Board columns in the order work flows; a status added to TaskStatus later gets a column
# at the end rather than no column.
_FLOW = ["waiting", "ready", "assigned", "running", "review", "blocked", "succeeded", "failed"]
BOARD_STATUSES = [s for s in [*_FLOW, "cancelled"] if s in TaskStatus.values] + [
    s for s in TaskStatus.values if s not in _FLOW and s != "cancelled"
]
RETRYABLE = {TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.BLOCKED}
COLUMN_CAP = 50  # cards per board column; the rest are one "N more" link away
LIST_PAGE = 100  # rows per page of a single-status list
LIVE_CARDS_MAX = 100  # more touched cards than this in one frame: redraw the whole board
EVENTS_SHOWN = 200  # the task page's event stream (and its resync)
GRAPH_MAX_NODES = 150
GRAPH_MAX_EDGES = 600
ARTIFACTS_SHOWN = 100
PREVIEWS_MAX = 12  # artifact names previewed (latest version each); others get a link
TASK_CHOICES = 500  # tasks offered in the create form's dependency/parent lists
STATUS_KINDS = ("task.", "attempt.")  # events that may change a task's status or holder
PLAN_KINDS = ("plan.", "checkpoint.")  # events that may change the task's plan block


# --- access ------------------------------------------------------------------------------


def _group_and_role(request: HttpRequest, slug: str, role: str = Role.VIEWER) -> tuple[Group, str]:
    """group_get_for_user, keeping the user's role (two queries)."""
    group = Group.objects.filter(slug=slug).first()
    if group is None:
        raise NotFound("No such group, or you are not a member of it.")
    return group, require_role(user=request.user, group_id=group.id, role=role)


def _can_write(role: str) -> bool:
    return Role.rank(role) >= Role.rank(Role.MEMBER)


def _board_url(group: Group) -> str:
    return reverse("dashboard:task_board", kwargs={"slug": group.slug})


def _int(value: object) -> int | None:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        return None
    return number if 0 < number <= DB_INT_MAX else None


# --- the board ---------------------------------------------------------------------------


@dataclass
class BoardFilters:
    toolkit: str = ""
    agent: int | None = None
    device: int | None = None
    parent: int | None = None
    status: str = ""  # one status: the paged list behind a column's "N more"
    page: int = 1

    @classmethod
    def parse(cls, data: Mapping[str, str]) -> "BoardFilters":
        """From GET parameters (or the socket's): unknown or malformed values are dropped."""
        toolkit = str(data.get("toolkit") or "").strip()[:50]
        status = str(data.get("status") or "")
        return cls(
            toolkit=toolkit,
            agent=_int(data.get("agent")),
            device=_int(data.get("device")),
            parent=_int(data.get("parent")),
            status=status if status in TaskStatus.values else "",
            page=min(_int(data.get("page")) or 1, DB_INT_MAX // LIST_PAGE),
        )

    def params(self) -> dict[str, str]:
        """The filters that are set, as strings (for URLs and the live socket)."""
        values = {
            "toolkit": self.toolkit,
            "agent": self.agent,
            "device": self.device,
            "parent": self.parent,
            "status": self.status,
        }
        return {key: str(value) for key, value in values.items() if value}

    def query(self, **changes: object) -> str:
        params = {**self.params(), "page": str(self.page) if self.page > 1 else ""}
        params.update({key: str(value) if value else "" for key, value in changes.items()})
        params = {key: value for key, value in params.items() if value}
        return "?" + urlencode(params) if params else ""

    @property
    def active(self) -> bool:
        return bool(self.toolkit or self.agent or self.device or self.parent)


def board_tasks(*, group: Group, filters: BoardFilters):
    """The group's tasks matching the board's filters, newest first. Agent and device
    filters mean "ever attempted there"."""
    tasks = tasks_for_group(
        group=group,
        toolkit=filters.toolkit or None,
        agent_id=filters.agent,
        parent_id=filters.parent,
    )
    if filters.device:
        tasks = tasks.filter(
            id__in=Attempt.objects.filter(device_id=filters.device).values("task_id")
        )
    return tasks


CARD_FIELDS = ("id", "title", "status", "required_toolkits", "epoch", "max_attempts", "priority")


@dataclass
class CardStyle:
    """What a card shows besides its task: action buttons (member+), where they return to,
    and the CSRF field (empty in live fragments: the page's hx-headers carry the token)."""

    can_write: bool = False
    next_url: str = ""
    csrf_input: str = ""


def card_html(task: Task, style: CardStyle) -> SafeString:
    """One board card. Built in Python rather than a template: a full board has 400 of
    them, and this is ten times faster than {% include %} per card."""
    toolkits = "".join(f"<li>{escape(slug)}</li>" for slug in task.required_toolkits or [])
    meta = ""
    if task.current:
        current = task.current
        meta = (
            f'<span class="holder{"" if task.live else " past"}" title="attempt '
            f'{current["epoch"]}: {escape(current["status"])}">{escape(current["agent__name"])} '
            f"@ {escape(current['device__name'])}</span> "
        )
    if task.epoch:
        meta += f'<span class="attempt-no">attempt {task.epoch}</span>'
    actions = ""
    if style.can_write and (task.cancellable or task.retryable):
        next_input = f'<input type="hidden" name="next" value="{escape(style.next_url)}">'
        forms = []
        for verb, label, extra, shown in (
            ("cancel", "Cancel", " danger", task.cancellable),
            ("retry", "Retry", "", task.retryable),
        ):
            if shown:
                forms.append(
                    f'<form method="post" action="{task.url}{verb}/">{style.csrf_input}'
                    f'{next_input}<button type="submit" class="small{extra}">{label}</button>'
                    "</form>"
                )
        actions = f'<div class="task-card-actions">{"".join(forms)}</div>'
    return mark_safe(  # noqa: S308 - every value above is escaped or an int
        f'<article id="task-card-{task.id}" class="task-card" data-status="{task.status}">'
        f'<a class="task-card-title" href="{task.url}">#{task.id} {escape(task.title)}</a>'
        f"{f'<ul class=chips>{toolkits}</ul>' if toolkits else ''}"
        f'<p class="task-card-meta">{meta}</p>{actions}</article>'
    )


def _cards(group: Group, tasks: list[Task], style: CardStyle) -> list[Task]:
    """Attach to each task its latest attempt (agent and device names), its URL and its
    card's HTML: one query for any number of cards."""
    latest = {
        row["task_id"]: row
        for row in Attempt.objects.filter(
            task_id__in=[t.id for t in tasks], epoch=F("task__epoch")
        ).values("task_id", "epoch", "status", "agent_id", "agent__name", "device__name")
    }
    base = _board_url(group)
    for task in tasks:
        task.current = latest.get(task.id)
        task.url = f"{base}{task.id}/"
        task.live = task.status in (TaskStatus.ASSIGNED, TaskStatus.RUNNING)
        task.cancellable = task.status not in TERMINAL_TASK_STATUSES
        task.retryable = task.status in RETRYABLE
        task.html = card_html(task, style)
    return tasks


def _column(status: str, count: int, cards: list[Task], filters: BoardFilters, url: str) -> dict:
    return {
        "status": status,
        "count": count,
        "cards": cards,
        "more": max(count - len(cards), 0),
        "more_url": url + filters.query(status=status, page=None),
    }


def board_data(*, group: Group, filters: BoardFilters, style: CardStyle) -> dict:
    """Columns of the board (or one status's page): three queries whatever the size."""
    url = _board_url(group)
    base = board_tasks(group=group, filters=filters)
    counts = dict(base.order_by().values_list("status").annotate(n=Count("id")))
    if filters.status:
        offset = (filters.page - 1) * LIST_PAGE
        tasks = list(
            base.filter(status=filters.status).only(*CARD_FIELDS)[offset : offset + LIST_PAGE]
        )
        total = counts.get(filters.status, 0)
        column = _column(filters.status, total, _cards(group, tasks, style), filters, url)
        column["more"] = 0
        pages = max((total + LIST_PAGE - 1) // LIST_PAGE, 1)
        return {
            "columns": [column],
            "counts": counts,
            "page": filters.page,
            "pages": pages,
            "prev_url": url + filters.query(page=filters.page - 1 if filters.page > 2 else None)
            if filters.page > 1
            else "",
            "next_url": url + filters.query(page=filters.page + 1) if filters.page < pages else "",
            "back_url": url + filters.query(status=None, page=None),
        }
    ranked = (
        base.only(*CARD_FIELDS)
        .annotate(
            rank=Window(
                RowNumber(),
                partition_by=[F("status")],
                order_by=[F("created_at").desc(), F("id").desc()],
            )
        )
        .filter(rank__lte=COLUMN_CAP)
    )
    by_status: dict[str, list[Task]] = {status: [] for status in BOARD_STATUSES}
    for task in _cards(group, list(ranked), style):
        by_status.setdefault(task.status, []).append(task)
    return {
        "columns": [
            _column(status, counts.get(status, 0), by_status[status], filters, url)
            for status in BOARD_STATUSES
        ],
        "counts": counts,
    }


def group_toolkits(group: Group) -> list[dict]:
    """Registered toolkits, with how many of the group's agents declare each: two queries."""
    declared: dict[str, int] = {}
    for toolkits in Agent.objects.filter(group=group).values_list("toolkits", flat=True):
        for slug in toolkits or {}:
            declared[slug] = declared.get(slug, 0) + 1
    return [
        {"slug": slug, "agents": declared.get(slug, 0)}
        for slug in Toolkit.objects.order_by("slug").values_list("slug", flat=True)
    ]


def _board_context(group: Group, role: str, filters: BoardFilters, csrf_input: str) -> dict:
    style = CardStyle(
        can_write=_can_write(role),
        next_url=_board_url(group) + filters.query(),
        csrf_input=csrf_input,
    )
    return {
        "group": group,
        "role": role,
        "can_write": style.can_write,
        "filters": filters,
        "board": board_data(group=group, filters=filters, style=style),
        "board_url": _board_url(group),
    }


@dashboard_view
def task_board(request: HttpRequest, slug: str) -> HttpResponse:
    group, role = _group_and_role(request, slug)
    filters = BoardFilters.parse(request.GET)
    context = live_context(page="board", group=group, **filters.params())
    csrf_input = format_html(
        '<input type="hidden" name="csrfmiddlewaretoken" value="{}">', get_token(request)
    )
    context.update(_board_context(group, role, filters, csrf_input))
    context.update(
        toolkits=group_toolkits(group),
        agents=list(
            Agent.objects.filter(group=group).order_by("name").values("id", "name", "device__name")
        ),
        devices=list(Device.objects.filter(group=group).order_by("name").values("id", "name")),
        create_url=reverse("dashboard:task_create", kwargs={"slug": group.slug}),
    )
    return render(request, "dashboard/task_board.html", context)


@live_page("board")
def board_live(ctx: LiveContext) -> list[str]:
    """Move the cards of the tasks these events touched to their status column (delete by
    id, then insert at the top of the right column), and refresh the column counts. A
    resync, or more touched tasks than LIVE_CARDS_MAX, redraws the board."""
    filters = BoardFilters.parse(ctx.params)
    touched = list(
        dict.fromkeys(
            e.task_id for e in ctx.events if e.task_id and e.kind.startswith(STATUS_KINDS)
        )
    )
    if ctx.resync or len(touched) > LIVE_CARDS_MAX:
        context = {**_board_context(ctx.group, ctx.role, filters, ""), "oob": True}
        return [render_to_string("dashboard/_task_board_columns.html", context)]
    if not touched:
        return []
    style = CardStyle(
        can_write=_can_write(ctx.role), next_url=_board_url(ctx.group) + filters.query()
    )
    matching = board_tasks(group=ctx.group, filters=filters).filter(id__in=touched)
    tasks = {task.id: task for task in _cards(ctx.group, list(matching.only(*CARD_FIELDS)), style)}
    fragments = []
    for task_id in touched:
        fragments.append(f'<div id="task-card-{task_id}" hx-swap-oob="delete"></div>')
        task = tasks.get(task_id)
        if task is not None and (not filters.status or filters.status == task.status):
            fragments.append(
                f'<div hx-swap-oob="afterbegin:#board-list-{task.status}">{task.html}</div>'
            )
    counts = dict(
        board_tasks(group=ctx.group, filters=filters)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
    )
    statuses = [filters.status] if filters.status else BOARD_STATUSES
    for status in statuses:
        column = _column(status, counts.get(status, 0), [], filters, _board_url(ctx.group))
        column["more"] = 0 if filters.status else max(column["count"] - COLUMN_CAP, 0)
        for template in ("_task_column_count.html", "_task_column_more.html"):
            fragments.append(
                render_to_string(f"dashboard/{template}", {"column": column, "oob": True})
            )
    return fragments


@require_POST
@dashboard_view
def task_cancel_view(request: HttpRequest, slug: str, task_id: int) -> HttpResponse:
    group, _ = _group_and_role(request, slug, Role.MEMBER)
    task = _task_in_group(request, group, task_id)
    cancelled = perform(
        request,
        lambda: task_cancel(actor=request.user, task=task, reason="cancelled in the dashboard"),
        prefix=f"Task #{task.id}: ",
    )
    if cancelled is not REFUSED:
        extra = f" and {len(cancelled) - 1} sub-task(s)" if len(cancelled) > 1 else ""
        messages.success(request, f"Cancelled task #{task.id}{extra}.")
    return _back(request, group, task)


@require_POST
@dashboard_view
def task_retry_view(request: HttpRequest, slug: str, task_id: int) -> HttpResponse:
    group, _ = _group_and_role(request, slug, Role.MEMBER)
    task = _task_in_group(request, group, task_id)
    retried = perform(
        request, lambda: task_retry(actor=request.user, task=task), prefix=f"Task #{task.id}: "
    )
    if retried is not REFUSED:
        task = retried
        messages.success(request, f"Task #{task.id} is {task.status} again.")
    return _back(request, group, task)


@require_POST
@dashboard_view
def task_plan_view(request: HttpRequest, slug: str, task_id: int) -> HttpResponse:
    """The "Plan with K2.6" button: ask the planner for sub-tasks (apps.tasks.planner)."""
    from apps.tasks.planner import plan_request

    group, _ = _group_and_role(request, slug, Role.MEMBER)
    task = _task_in_group(request, group, task_id)
    planned = perform(
        request, lambda: plan_request(actor=request.user, task=task), prefix=f"Task #{task.id}: "
    )
    if planned is not REFUSED:
        messages.success(
            request, f"Planning task #{task.id}: the plan comes as a checkpoint to approve."
        )
    return _back(request, group, task)


def _task_in_group(request: HttpRequest, group: Group, task_id: int, **kwargs) -> Task:
    task = task_get_for_user(user=request.user, task_id=task_id, **kwargs)
    if task.group_id != group.id:
        raise NotFound("No such task in this group.")
    return task


def _back(request: HttpRequest, group: Group, task: Task) -> HttpResponse:
    return back(request, f"{_board_url(group)}{task.id}/")


# --- creating a task ---------------------------------------------------------------------


class AnyIdMultipleChoiceField(forms.TypedMultipleChoiceField):
    """Task ids: the offered choices are only the newest tasks, so any id is accepted here
    and the service checks that it is in the group."""

    def valid_value(self, value: object) -> bool:
        return _int(value) is not None


class AnyIdChoiceField(forms.TypedChoiceField):
    def valid_value(self, value: object) -> bool:
        return _int(value) is not None


class TaskForm(forms.Form):
    title = forms.CharField(max_length=200)
    instructions = forms.CharField(
        required=False, max_length=100_000, widget=forms.Textarea(attrs={"rows": 6})
    )
    required_toolkits = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple
    )
    depends_on = AnyIdMultipleChoiceField(
        required=False, coerce=int, widget=forms.SelectMultiple(attrs={"size": 8})
    )
    parent = AnyIdChoiceField(required=False, coerce=int, empty_value=None)
    steps = forms.CharField(
        required=False,
        widget=forms.Textarea(
            attrs={
                "rows": 6,
                "spellcheck": "false",
                "placeholder": '[{"tool": "shell.run", "args": {"cmd": "make test"}}]',
            }
        ),
        help_text='Optional explicit tool calls: a JSON list of {"tool": ..., "args": {...}}.',
    )
    max_attempts = forms.IntegerField(required=False, min_value=1, max_value=100)
    priority = forms.IntegerField(initial=0, min_value=-100, max_value=100)
    checkpoint_policy = forms.ChoiceField(
        required=False, choices=[("", "Group default"), *CheckpointPolicy.choices]
    )
    dependency_failure_policy = forms.ChoiceField(
        required=False, choices=[("", "Group default"), *DependencyFailurePolicy.choices]
    )

    def __init__(self, *args, toolkits: list[dict], tasks: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["required_toolkits"].choices = [
            (t["slug"], f"{t['slug']} ({t['agents']} agent{'s' if t['agents'] != 1 else ''})")
            for t in toolkits
        ]
        task_choices = [(t["id"], f"#{t['id']} {t['title']} ({t['status']})") for t in tasks]
        self.fields["depends_on"].choices = task_choices
        self.fields["parent"].choices = [("", "— none (a root task) —"), *task_choices]
        self.fields["max_attempts"].widget.attrs["placeholder"] = "group default"

    def clean_steps(self) -> list:
        raw = self.cleaned_data.get("steps", "").strip()
        if not raw:
            return []
        try:
            steps = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(
                f"Not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}."
            ) from None
        if not isinstance(steps, list):
            raise forms.ValidationError(
                'Steps must be a JSON list: [{"tool": ..., "args": {...}}].'
            )
        return steps


# Which form field a task_create error belongs to: by code, then by the message's start.
ERROR_FIELDS_BY_CODE = {
    "invalid_steps": "steps",
    "unknown_toolkit": "required_toolkits",
    "unknown_dependency": "depends_on",
}
ERROR_FIELDS_BY_PREFIX = {
    "steps": "steps",
    "a task needs a title": "title",
    "priority": "priority",
    "max_attempts": "max_attempts",
    "parent": "parent",
    "a task depends on": "depends_on",
    "checkpoint_policy": "checkpoint_policy",
    "dependency_failure_policy": "dependency_failure_policy",
}


def _error_field(exc: DomainError) -> str | None:
    if exc.code in ERROR_FIELDS_BY_CODE:
        return ERROR_FIELDS_BY_CODE[exc.code]
    message = exc.message.lower()
    return next((f for p, f in ERROR_FIELDS_BY_PREFIX.items() if message.startswith(p)), None)


def _task_choices(group: Group, extra_ids: Iterable[int]) -> list[dict]:
    """The newest TASK_CHOICES tasks, plus any the form names that are older (so a
    re-shown form keeps them selected): one query."""
    extra = [i for i in extra_ids if i]
    newest = Task.objects.filter(group=group).order_by("-created_at", "-id")
    ids = list(newest.values_list("id", flat=True)[:TASK_CHOICES])
    return list(
        Task.objects.filter(group=group)
        .filter(Q(id__in=ids) | Q(id__in=extra))
        .order_by("-created_at", "-id")
        .values("id", "title", "status")
    )


def _options_html(choices: Iterable[tuple], selected: Iterable[object]) -> SafeString:
    chosen = {str(value) for value in selected if value not in (None, "")}
    return mark_safe(  # noqa: S308 - values and labels are escaped
        "".join(
            f'<option value="{escape(value)}"{" selected" if str(value) in chosen else ""}>'
            f"{escape(label)}</option>"
            for value, label in choices
        )
    )


@dashboard_view
def task_create_view(request: HttpRequest, slug: str) -> HttpResponse:
    group, role = _group_and_role(request, slug, Role.MEMBER)
    data = request.POST if request.method == "POST" else None
    named = [_int(v) for v in [*data.getlist("depends_on"), data.get("parent")]] if data else []
    initial = {"parent": _int(request.GET.get("parent"))} if data is None else None
    if initial and initial["parent"]:
        named.append(initial["parent"])
    form = TaskForm(
        data,
        initial=initial,
        toolkits=group_toolkits(group),
        tasks=_task_choices(group, named),
    )
    if data is not None and form.is_valid():
        values = form.cleaned_data
        try:
            task = task_create(
                group=group,
                actor=request.user,
                title=values["title"],
                instructions=values["instructions"],
                steps=values["steps"],
                required_toolkits=values["required_toolkits"],
                priority=values["priority"],
                max_attempts=values["max_attempts"],
                parent_id=values["parent"],
                depends_on=values["depends_on"],
                checkpoint_policy=values["checkpoint_policy"] or None,
                dependency_failure_policy=values["dependency_failure_policy"] or None,
            )
        except DomainError as exc:
            if isinstance(exc, NotFound | Forbidden):
                raise
            form.add_error(_error_field(exc), exc.message)
        else:
            messages.success(request, f"Created task #{task.id}.")
            return redirect(f"{_board_url(group)}{task.id}/")
    # The two task lists are built here: Django's widgets render each of their up to
    # TASK_CHOICES options through a template, which costs more than the rest of the page.
    depends_on = form["depends_on"].value() or []
    parent = form["parent"].value()
    return render(
        request,
        "dashboard/task_create.html",
        {
            "group": group,
            "role": role,
            "form": form,
            "task_options": {
                "depends_on": _options_html(form.fields["depends_on"].choices, depends_on),
                "parent": _options_html(form.fields["parent"].choices, [parent]),
            },
            "board_url": _board_url(group),
        },
        status=422 if data is not None else 200,
    )


# --- the task page -----------------------------------------------------------------------


def task_graph(task: Task, group: Group) -> Layout:
    """The task's root tree and the dependencies touching it, laid out in layers: three
    queries. A tree larger than GRAPH_MAX_NODES shows the task's neighbourhood instead
    (parent, children, dependencies, dependents)."""
    fields = ("id", "title", "status", "parent_id")
    rows = list(
        Task.objects.filter(root_id=task.root_id or task.id).values(*fields)[: GRAPH_MAX_NODES + 1]
    )
    partial = len(rows) > GRAPH_MAX_NODES
    if partial:
        rows = list(
            Task.objects.filter(
                Q(id=task.id)
                | Q(id=task.parent_id or 0)
                | Q(parent_id=task.id)
                | Q(dependent_links__task_id=task.id)
                | Q(dependency_links__depends_on_id=task.id)
            )
            .distinct()
            .values(*fields)[:GRAPH_MAX_NODES]
        )
    ids = {row["id"] for row in rows}
    links = list(
        TaskDependency.objects.filter(Q(task_id__in=ids) | Q(depends_on_id__in=ids)).values_list(
            "depends_on_id", "task_id"
        )[:GRAPH_MAX_EDGES]
    )
    outside = {i for link in links for i in link} - ids
    room = max(GRAPH_MAX_NODES - len(rows), 0)
    rows += list(Task.objects.filter(id__in=sorted(outside)[:room] or [0]).values(*fields))
    base = _board_url(group)
    ids = {row["id"] for row in rows}
    nodes = [
        Node(
            id=row["id"],
            title=row["title"],
            status=row["status"],
            current=row["id"] == task.id,
            url=f"{base}{row['id']}/",
        )
        for row in rows
    ]
    edges = [Edge(src, dst, "dependency") for src, dst in links if src in ids and dst in ids]
    edges += [
        Edge(row["parent_id"], row["id"], "parent")
        for row in rows
        if row["parent_id"] in ids and row["parent_id"] != row["id"]
    ]
    drawn = layout(nodes, edges)
    drawn.extra = {"partial": partial, "outside": len(outside)}
    return drawn


TIMELINE_WIDTH = 640  # px of the time axis
TIMELINE_ROW = 30
TIMELINE_LABEL = 190


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def attempt_timeline(attempts: list[Attempt], now: datetime | None = None) -> dict:
    """One row per agent/device pair, in order of first attempt; each attempt a bar from
    offered to ended (now while live), the part before it started drawn lighter."""
    now = now or timezone.now()
    if not attempts:
        return {"rows": [], "attempts": [], "width": 0, "height": 0}
    # Clocks differ (offered_at is the server's, started_at may come from a replayed
    # frame): a bar begins at the earlier of the two.
    start = min(min(a.offered_at, a.started_at or a.offered_at) for a in attempts)
    end = max(max((a.ended_at or now) for a in attempts), start)
    span = max(_seconds(start, end), 1.0)
    scale = TIMELINE_WIDTH / span

    def x(moment: datetime) -> float:
        return round(TIMELINE_LABEL + _seconds(start, moment) * scale, 1)

    rows: dict[tuple[int, int], dict] = {}
    bars = []
    for attempt in sorted(attempts, key=lambda a: a.epoch):
        key = (attempt.agent_id, attempt.device_id)
        if key not in rows:
            rows[key] = {
                "index": len(rows),
                "label": f"{attempt.agent.name} @ {attempt.device.name}",
            }
        row = rows[key]
        finish = attempt.ended_at or now
        begin = x(min(attempt.offered_at, attempt.started_at or attempt.offered_at))
        started = x(attempt.started_at) if attempt.started_at else None
        stop = max(x(finish), begin + 4)
        attempt.live = attempt.status in (AttemptStatus.OFFERED, AttemptStatus.RUNNING)
        attempt.why = _why(attempt.choice)
        bars.append(
            {
                "attempt": attempt,
                "row": row["index"],
                "y": row["index"] * TIMELINE_ROW + 6,
                "x": begin,
                "w": round(stop - begin, 1),
                "run_x": started,
                "run_w": round(stop - started, 1) if started is not None else 0,
                "label_x": round(begin + 3, 1),
            }
        )
    height = len(rows) * TIMELINE_ROW + 22
    ticks = [
        {"x": round(TIMELINE_LABEL + TIMELINE_WIDTH * i / 4, 1), "label": _duration(span * i / 4)}
        for i in range(5)
    ]
    return {
        "rows": [{"y": r["index"] * TIMELINE_ROW, **r} for r in rows.values()],
        "bars": bars,
        "attempts": sorted(attempts, key=lambda a: -a.epoch),
        "width": TIMELINE_LABEL + TIMELINE_WIDTH + 40,
        "height": height,
        "axis_y": len(rows) * TIMELINE_ROW + 4,
        "ticks": ticks,
        "start": start,
        "reassigned": len(rows) > 1,
    }


# The matcher's candidate fields, in reading order (JSONB does not keep key order).
CANDIDATE_COLUMNS = ("name", "device_id", "success_rate", "load", "avoided_device")


def _why(choice: object) -> dict | None:
    """Attempt.choice ("why this agent") as a reason, a candidates table and scores."""
    if not isinstance(choice, dict) or not choice:
        return None
    candidates = [c for c in choice.get("candidates") or [] if isinstance(c, dict)]
    keys = {key for c in candidates for key in c if key != "agent_id"}
    headers = [k for k in CANDIDATE_COLUMNS if k in keys] + sorted(keys - set(CANDIDATE_COLUMNS))
    chosen = choice.get("chosen")
    rows = [
        {
            "chosen": c.get("agent_id") == chosen and chosen is not None,
            "cells": [_score(c.get(key)) for key in headers],
        }
        for c in candidates
    ]
    scores = choice.get("scores")
    return {
        "reason": str(choice.get("reason") or ""),
        "headers": headers,
        "rows": rows,
        "scores": [(str(k), _score(v)) for k, v in scores.items()]
        if isinstance(scores, dict)
        else [],
    }


def _score(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _event_summary(event: Event) -> str:
    payload = event.payload if isinstance(event.payload, dict) else {}
    kind = event.kind
    if kind == "progress.step":
        ok = "ok" if payload.get("ok", True) else f"failed: {payload.get('error', '')}"
        return f"step {payload.get('index', '?')} {payload.get('tool', '')} — {ok}"
    if kind == "progress.tool_call":
        return f"{payload.get('tool', '')} {json.dumps(payload.get('args', {}))[:200]}"
    if kind == "progress.log":
        if payload.get("changes_requested"):
            return f"changes requested: {payload['changes_requested']}"[:300]
        if payload.get("feedback"):
            return f"reviewer feedback: {payload['feedback']}"[:300]
        return str(payload.get("message") or payload.get("text") or payload.get("line") or "")[:300]
    if kind.startswith("artifact."):
        return f"{payload.get('name', '')} v{payload.get('version', '')}"
    parts = []
    if "status" in payload:
        parts.append(f"→ {payload['status']}")
    if payload.get("reason"):
        parts.append(str(payload["reason"])[:300])
    if "epoch" in payload:
        parts.append(f"attempt {payload['epoch']}")
    return " · ".join(parts)


def event_rows(events: list[Event]) -> list[dict]:
    """Rows of the event stream, agent names resolved in one query."""
    names = dict(
        Agent.objects.filter(id__in={e.agent_id for e in events if e.agent_id} or {0}).values_list(
            "id", "name"
        )
    )
    return [
        {
            "seq": event.seq,
            "kind": event.kind,
            "family": event.kind.split(".", 1)[0],
            "created_at": event.created_at,
            "agent": names.get(event.agent_id, ""),
            "summary": _event_summary(event),
            "payload": json.dumps(event.payload, indent=1, default=str)[:2000],
        }
        for event in events
    ]


def task_events(task: Task) -> list[dict]:
    latest = list(Event.objects.filter(task_id=task.id).order_by("-seq")[:EVENTS_SHOWN])
    return event_rows(latest[::-1])


def artifact_groups(task: Task, slug: str) -> list[dict]:
    """Artifacts by name, newest version first; the latest of each name previewed (for
    the first PREVIEWS_MAX names). One query, plus reading the previewed files."""
    artifacts = list(artifacts_for_task(task=task).order_by("name", "-version")[:ARTIFACTS_SHOWN])
    base = f"/g/{slug}/tasks/{task.id}/artifacts/"
    named: dict[str, dict] = {}
    for artifact in artifacts:
        artifact.download_url = f"{base}{artifact.id}/"
        entry = named.setdefault(artifact.name, {"name": artifact.name, "versions": []})
        entry["versions"].append(artifact)
    for index, entry in enumerate(named.values()):
        latest = entry["latest"] = entry["versions"][0]
        entry["older"] = entry["versions"][1:]
        entry["preview"] = artifact_preview(latest) if index < PREVIEWS_MAX else None
        entry["inline_url"] = f"{latest.download_url}?inline=1"
    return list(named.values())


def _task_context(task: Task, group: Group, role: str, attempts: list[Attempt]) -> dict:
    return {
        "task": task,
        "group": group,
        "role": role,
        "can_write": _can_write(role),
        "board_url": _board_url(group),
        "task_url": f"{_board_url(group)}{task.id}/",
        "cancellable": task.status not in TERMINAL_TASK_STATUSES,
        "retryable": task.status in RETRYABLE,
        "plannable": task.status not in TERMINAL_TASK_STATUSES and llm.configured(),
        "timeline": attempt_timeline(attempts),
        "result_json": json.dumps(task.result, indent=2, default=str)
        if task.result is not None
        else "",
    }


@dashboard_view
def task_detail(request: HttpRequest, slug: str, task_id: int) -> HttpResponse:
    group, role = _group_and_role(request, slug)
    context = live_context(page="task", group=group, task=task_id)
    task = _task_in_group(request, group, task_id, detail=True)
    parent = (
        Task.objects.filter(id=task.parent_id).values("id", "title").first()
        if task.parent_id
        else None
    )
    context.update(_task_context(task, group, role, list(task.attempts.all())))
    context.update(
        parent=parent,
        depends_on=sorted(link.depends_on_id for link in task.dependency_links.all()),
        steps_json=json.dumps(task.steps, indent=2),
        result_json=json.dumps(task.result, indent=2, default=str)
        if task.result is not None
        else "",
        graph=task_graph(task, group),
        plan=task_plan_block(task=task, group=group, role=role, next_url=context["task_url"]),
        events=task_events(task),
        artifacts=artifact_groups(task, group.slug),
        subtask_url=reverse("dashboard:task_create", kwargs={"slug": group.slug})
        + f"?parent={task.id}",
    )
    return render(request, "dashboard/task_detail.html", context)


@live_page("task", params=("task",))
def task_live(ctx: LiveContext) -> list[str]:
    """Append this task's new events; refresh its status, actions and result, its attempt
    timeline, its artifacts on artifact events, and the graph when a task drawn in it
    changed. A resync redraws all of it (the stream: its last EVENTS_SHOWN events)."""
    task_id = _int(ctx.params.get("task"))
    task = Task.objects.filter(id=task_id, group=ctx.group).first() if task_id else None
    if task is None:
        return []
    mine = [e for e in ctx.events if e.task_id == task.id]
    changed = [e for e in ctx.events if e.task_id and e.kind.startswith(STATUS_KINDS)]
    if not ctx.resync and not mine and not changed:
        return []
    attempts = list(
        Attempt.objects.filter(task=task).select_related("agent", "device").order_by("epoch")
    )
    context = {**_task_context(task, ctx.group, ctx.role, attempts), "oob": True}
    fragments = []
    if ctx.resync or mine:
        for template in ("_task_status.html", "_task_actions.html", "_task_result.html"):
            fragments.append(render_to_string(f"dashboard/{template}", context))
        fragments.append(render_to_string("dashboard/_task_timeline.html", context))
    if ctx.resync:
        context["events"] = task_events(task)
        fragments.append(render_to_string("dashboard/_task_events.html", context))
    elif mine:
        rows = render_to_string("dashboard/_task_event_rows.html", {"events": event_rows(mine)})
        fragments.append(f'<div hx-swap-oob="beforeend:#event-stream">{rows}</div>')
    if ctx.resync or any(e.kind.startswith(PLAN_KINDS) for e in mine):
        context["plan"] = task_plan_block(
            task=task, group=ctx.group, role=ctx.role, next_url=context["task_url"]
        )
        fragments.append(render_to_string("dashboard/_task_plan.html", context))
    if ctx.resync or any(e.kind.startswith("artifact.") for e in mine):
        context["artifacts"] = artifact_groups(task, ctx.group.slug)
        fragments.append(render_to_string("dashboard/_task_artifacts.html", context))
    if ctx.resync or changed:
        graph = task_graph(task, ctx.group)
        drawn = {node.id for node in graph.nodes}
        if ctx.resync or any(e.task_id in drawn for e in changed):
            context["graph"] = graph
            fragments.append(render_to_string("dashboard/_task_graph.html", context))
    return fragments


@dashboard_view
def artifact_download(request: HttpRequest, slug: str, task_id: int, artifact_id: int):
    """An artifact's file for a signed-in member (apps.tasks.downloads: inline only for
    the page's image previews)."""
    group, _ = _group_and_role(request, slug)
    artifact = Artifact.objects.filter(id=artifact_id, task_id=task_id, group=group).first()
    if artifact is None:
        raise Http404("No such artifact.")
    return artifact_file_response(artifact, inline=request.GET.get("inline") == "1")
