"""The Model page (`/g/SLUG/model/`): the model backend as the probe sees it (status, model,
context length, latest metrics, the last hour as sparklines) and this group's token budget
and model calls; owners set the budget there. And the backend banner every page shows
while the backend is down or saturated.

Live: the page follows the backend probe (`#model-backend` is redrawn after each probe,
through PAGE_FOLLOWS: probes are not events) and redraws `#model-usage` on the group's
`llm.*` events. The banner is redrawn by the page socket on `llm.backend` events."""

from datetime import datetime, timedelta

from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.utils import timezone
from django.views.decorators.http import require_POST

from apps.dashboard.access import REFUSED, dashboard_view, perform
from apps.dashboard.forms import BudgetForm, form_errors_text
from apps.dashboard.live import LiveContext, live_context, live_page
from apps.groups.models import Group, Role
from apps.groups.selectors import group_with_role_for_user
from apps.llm.models import BackendProbe
from apps.llm.selectors import backend_probes_since, backend_state, llm_calls_recent
from apps.llm.services import BACKEND_CHANNEL, group_llm_budget_set

CHART_WINDOW = timedelta(hours=1)
USAGE_WINDOW = timedelta(hours=24)
CHART_WIDTH, CHART_HEIGHT = 240, 40
# Events that change the banner, and those that change the page's usage section.
BACKEND_KINDS = ("llm.backend",)
USAGE_KINDS = ("llm.", "group.updated")


def _fragment(template: str, context: dict) -> str:
    return render_to_string(template, {**context, "oob": True})


# --- the banner ----------------------------------------------------------------------------


def backend_banner_html(*, oob: bool = True) -> str:
    """`#backend-banner`: shown while the backend is down or saturated, else an empty
    placeholder that the page socket can swap a banner into. A cached read."""
    state = backend_state()
    return render_to_string("dashboard/_backend_banner.html", {"backend": state, "oob": oob})


# --- sparklines ------------------------------------------------------------------------------


def _segments(probes: list[BackendProbe], field: str, start: datetime, top: float) -> list[str]:
    """SVG polyline points for one metric over CHART_WINDOW; a probe without the value (the
    backend was down, or does not report it) breaks the line, a lone point is a dash."""
    window = CHART_WINDOW.total_seconds()
    segments: list[list[tuple[float, float]]] = [[]]
    for probe in probes:
        value = getattr(probe, field)
        if value is None:
            segments.append([])
            continue
        x = CHART_WIDTH * min(max((probe.at - start).total_seconds() / window, 0.0), 1.0)
        y = CHART_HEIGHT - 1 - (CHART_HEIGHT - 3) * min(max(value / top, 0.0), 1.0)
        segments[-1].append((x, y))
    drawn = []
    for points in filter(None, segments):
        if len(points) == 1:
            x, y = points[0]
            points = [(x, y), (x + 1.5 if x + 1.5 <= CHART_WIDTH else x - 1.5, y)]
        drawn.append(" ".join(f"{x:.1f},{y:.1f}" for x, y in points))
    return drawn


def _shown(value: float) -> int | float:
    """29.0 → 29, 0.4217 → 0.4: numbers as a person reads them."""
    value = round(value, 1)
    return int(value) if value == int(value) else value


def _chart(
    probes: list[BackendProbe],
    start: datetime,
    *,
    key: str,
    title: str,
    fields: list[tuple[str, str]],
    unit: str = "",
    top: float | None = None,
    scale: float = 1.0,
) -> dict:
    """One sparkline (one line per field): {key, title, unit, series, peak, empty}."""
    values = [getattr(p, f) for p in probes for f, _ in fields if getattr(p, f) is not None]
    peak = max(values, default=0.0)
    top = top if top is not None else (peak or 1.0)
    series = []
    for index, (field, label) in enumerate(fields):
        last = next(
            (getattr(p, field) for p in reversed(probes) if getattr(p, field) is not None), None
        )
        series.append(
            {
                "index": index,
                "label": label,
                "segments": _segments(probes, field, start, top),
                "last": None if last is None else _shown(last * scale),
            }
        )
    return {
        "key": key,
        "title": title,
        "unit": unit,
        "series": series,
        "peak": _shown(peak * scale),
        "empty": not values,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
    }


# --- the page ------------------------------------------------------------------------------


def _backend_data() -> dict:
    """The backend's status and the last hour of probes: one query (and the state's cached
    read), however many probes."""
    state = backend_state()
    start = timezone.now() - CHART_WINDOW
    probes = backend_probes_since(since=start) if state.probing else []
    charts = [
        _chart(
            probes,
            start,
            key="requests",
            title="Requests",
            fields=[("running", "running"), ("queued", "queued")],
        ),
        _chart(
            probes,
            start,
            key="throughput",
            title="Generation",
            fields=[("gen_throughput", "")],
            unit=" tok/s",
        ),
        _chart(
            probes,
            start,
            key="ttft",
            title="Time to first token",
            fields=[("ttft_ms", "")],
            unit=" ms",
        ),
        _chart(
            probes,
            start,
            key="kv",
            title="KV cache in use",
            fields=[("kv_usage", "")],
            unit=" %",
            top=1.0,
            scale=100,
        ),
    ]
    return {
        "backend": state,
        "model_name": settings.CLAW_LLM_MODEL,
        "latest": probes[-1] if probes else None,
        # What the backend said it serves, the last time it answered.
        "served": next((p for p in reversed(probes) if p.model_id), None),
        "probe_seconds": settings.CLAW_LLM_PROBE_SECONDS,
        "charts": charts,
    }


def _usage_data(group_id: int, role: str) -> dict:
    """The group's budget and its model calls in the last USAGE_WINDOW: three queries."""
    budget, used = Group.objects.filter(id=group_id).values_list(
        "llm_token_budget", "llm_tokens_used"
    )[0]
    percent = None
    if budget is not None:
        percent = 100 if budget == 0 else min(100, round(100 * used / budget))
    return {
        "budget": budget,
        "used": used,
        "percent": percent,
        "exhausted": budget is not None and used >= budget,
        "calls": llm_calls_recent(group_id=group_id, since=timezone.now() - USAGE_WINDOW),
        "is_owner": role == Role.OWNER,
    }


@live_page("model", follows=(BACKEND_CHANNEL,))
def model_live(ctx: LiveContext) -> list[str]:
    fragments = []
    if ctx.touches(BACKEND_KINDS):  # a probe (a redraw), or a status change
        fragments.append(_fragment("dashboard/_model_backend.html", _backend_data()))
    if ctx.touches(USAGE_KINDS):
        fragments.append(
            _fragment("dashboard/_model_usage.html", _usage_data(ctx.group.id, ctx.role))
        )
    return fragments


@dashboard_view
def model(request: HttpRequest, slug: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    context = live_context(page="model", group=group)
    context.update(_backend_data())
    context.update(_usage_data(group.id, group.role), group=group, role=group.role)
    context["budget_form"] = BudgetForm(initial={"budget": context["budget"]})
    return render(request, "dashboard/model.html", context)


@dashboard_view
@require_POST
def model_budget(request: HttpRequest, slug: str) -> HttpResponse:
    """An owner sets the group's token budget (empty: unlimited)."""
    group = group_with_role_for_user(user=request.user, slug=slug, role=Role.OWNER)
    form = BudgetForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors_text(form))
        return redirect("dashboard:model", slug=slug)
    budget = form.cleaned_data["budget"]
    done = perform(
        request,
        lambda: group_llm_budget_set(actor=request.user, group_id=group.id, budget=budget),
    )
    if done is not REFUSED:
        text = "unlimited" if budget is None else f"{budget:,} tokens"
        messages.success(request, f"The model token budget is now {text}.")
    return redirect("dashboard:model", slug=slug)
