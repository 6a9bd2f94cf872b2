"""Dashboard pages: groups, members, invites, tokens, overview, agents & devices, approvals.

Views parse input, call a service and render; permissions are the services' and selectors'
(outsiders get 404, members below the needed role 403). Each live page has a renderer
registered with @live_page (the contract: apps.dashboard.live) that redraws its fragments
with a fixed number of queries, however many events or tasks there are."""

from collections import defaultdict
from datetime import timedelta

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, F, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointStatus
from apps.checkpoints.selectors import (
    checkpoint_get_for_user,
    checkpoints_pending_count_for_user,
    checkpoints_pending_for_user,
)
from apps.checkpoints.services import checkpoint_decide
from apps.dashboard.access import REFUSED, back, dashboard_view, perform
from apps.dashboard.forms import (
    DecisionForm,
    DrainForm,
    GroupCreateForm,
    InviteCreateForm,
    RoleForm,
    TokenCreateForm,
    form_errors_text,
)
from apps.dashboard.live import BADGE_KINDS, LiveContext, live_context, live_page
from apps.dashboard.plan_views import approvals_plan_blocks
from apps.devices.models import Agent, AgentStatus, Device
from apps.devices.selectors import agent_get_for_user, device_get_for_user
from apps.devices.services import (
    agent_set_draining,
    device_revoke,
    device_set_draining,
    pairing_code_create,
)
from apps.events.models import Event
from apps.groups.models import Group, Invite, Membership, Role
from apps.groups.selectors import (
    api_tokens_for_user,
    group_with_role_for_user,
    groups_with_role_for_user,
    member_user_get,
    members_of,
)
from apps.groups.services import (
    api_token_create,
    api_token_revoke,
    group_create,
    invite_accept,
    invite_create,
    invite_get_by_token,
    invite_revoke,
    membership_remove,
    membership_set_role,
)
from apps.tasks.models import LIVE_ATTEMPT_STATUSES, Attempt, Task, TaskStatus
from claw.errors import DomainError, Forbidden, NotFound

THROUGHPUT_BUCKETS = 12  # the last hour, in 5-minute bars
THROUGHPUT_BUCKET_S = 300
RECENT_EVENTS = 15
APPROVALS_SHOWN = 100

# Event kinds that change what each live page shows.
AGENT_PAGE_KINDS = ("agent.", "device.", "task.", "attempt.")
MEMBER_PAGE_KINDS = ("member.", "invite.")


def _fragment(template: str, context: dict) -> str:
    """A fragment for the page socket: the template's root element, swapped in by id."""
    return render_to_string(template, {**context, "oob": True})


def _anchor_group(user: AbstractBaseUser) -> Group | None:
    """Pages that span groups open their socket on one of the user's groups; the consumer
    follows all of them for the approvals badge and for cross-group pages."""
    return Group.objects.filter(memberships__user=user).order_by("id").first()


def _cross_group_live(user: AbstractBaseUser, page: str) -> dict:
    group = _anchor_group(user)
    return live_context(page=page, group=group) if group is not None else {}


# --- approvals (shared by the badge, the inbox and the overview) --------------------------


def approvals_badge_html(*, user: AbstractBaseUser, oob: bool = True) -> str:
    return render_to_string(
        "dashboard/_approvals_badge.html",
        {"approvals_count": checkpoints_pending_count_for_user(user=user), "oob": oob},
    )


def _approvals_data(user: AbstractBaseUser) -> dict:
    checkpoints = list(
        checkpoints_pending_for_user(user=user).annotate(
            approvals=Count("decisions", filter=Q(decisions__verdict="approve"))
        )[:APPROVALS_SHOWN]
    )
    for checkpoint in checkpoints:
        checkpoint.reassign = (
            checkpoint.kind == CheckpointKind.MAX_ATTEMPTS and "reassign" in checkpoint.options
        )
    reassign_groups = {c.group_id for c in checkpoints if c.reassign}
    agents = defaultdict(list)
    if reassign_groups:
        for agent in (
            Agent.objects.filter(group_id__in=reassign_groups, device__revoked_at=None)
            .exclude(status=AgentStatus.OFFLINE)
            .order_by("name", "id")
        ):
            agents[agent.group_id].append(agent)
    for checkpoint in checkpoints:
        checkpoint.agent_choices = (
            agents.get(checkpoint.group_id, []) if checkpoint.reassign else []
        )
    approvals_plan_blocks(user=user, checkpoints=checkpoints)
    return {"checkpoints": checkpoints}


@live_page("approvals")
def approvals_live(ctx: LiveContext) -> list[str]:
    # Cross-group: the consumer also calls it (resync) for checkpoint changes elsewhere.
    if not ctx.touches(BADGE_KINDS):
        return []
    return [_fragment("dashboard/_approvals_list.html", _approvals_data(ctx.user))]


@login_required
def approvals(request: HttpRequest) -> HttpResponse:
    context = _cross_group_live(request.user, "approvals")
    context.update(_approvals_data(request.user))
    return render(request, "dashboard/approvals.html", context)


@dashboard_view
@require_POST
def checkpoint_decide_view(request: HttpRequest, checkpoint_id: int) -> HttpResponse:
    checkpoint = checkpoint_get_for_user(user=request.user, checkpoint_id=checkpoint_id)
    approvals_url = reverse("dashboard:approvals")
    form = DecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Checkpoint “{checkpoint.title}”: {form_errors_text(form)}")
        return back(request, approvals_url)
    data = form.cleaned_data
    decided = perform(
        request,
        lambda: checkpoint_decide(
            actor=request.user,
            checkpoint=checkpoint,
            verdict=data["verdict"],
            note=data["note"],
            option=data["option"],
            assign_to=data["assign_to"],
        ),
        prefix=f"Checkpoint “{checkpoint.title}”: ",
    )
    if decided is not REFUSED:
        verdict = dict(DecisionForm.base_fields["verdict"].choices)[data["verdict"]]
        messages.success(request, f"{verdict}: “{checkpoint.title}”.")
    return back(request, approvals_url)


# --- groups --------------------------------------------------------------------------------


def _groups_data(user: AbstractBaseUser) -> dict:
    return {"groups": list(groups_with_role_for_user(user=user))}


@live_page("groups")
def groups_live(ctx: LiveContext) -> list[str]:
    if not ctx.touches(("member.", "group.")):
        return []
    return [_fragment("dashboard/_groups_list.html", _groups_data(ctx.user))]


@login_required
@require_http_methods(["GET", "POST"])
def groups(request: HttpRequest) -> HttpResponse:
    form = GroupCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            group = group_create(
                user=request.user, name=form.cleaned_data["name"], slug=form.cleaned_data["slug"]
            )
        except DomainError as error:
            form.add_error("slug" if error.code == "slug_taken" else None, error.message)
        else:
            messages.success(request, f"Created {group.name}. You are its owner.")
            return redirect("dashboard:overview", slug=group.slug)
    context = _cross_group_live(request.user, "groups")
    context.update(_groups_data(request.user), form=form)
    return render(request, "dashboard/groups.html", context, status=400 if form.errors else 200)


@live_page("nav")
def nav_live(ctx: LiveContext) -> list[str]:
    """Pages with nothing live but the navigation's approvals badge."""
    return []


# --- overview ------------------------------------------------------------------------------


def _overview_data(group: Group) -> dict:
    counts = dict(
        Task.objects.filter(group=group)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    agent_counts = dict(
        Agent.objects.filter(group=group)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    now = timezone.now()
    start = now - timedelta(seconds=THROUGHPUT_BUCKETS * THROUGHPUT_BUCKET_S)
    buckets = [0] * THROUGHPUT_BUCKETS
    for created_at in Event.objects.filter(
        group=group, kind="task.succeeded", created_at__gt=start
    ).values_list("created_at", flat=True):
        index = int((created_at - start).total_seconds() // THROUGHPUT_BUCKET_S)
        buckets[min(max(index, 0), THROUGHPUT_BUCKETS - 1)] += 1
    return {
        "group": group,
        "task_counts": [(status, counts.get(status, 0)) for status in TaskStatus.values],
        "tasks_total": sum(counts.values()),
        "agents_online": agent_counts.get(AgentStatus.ONLINE, 0)
        + agent_counts.get(AgentStatus.BUSY, 0),
        "agents_total": sum(agent_counts.values()),
        "pending_approvals": Checkpoint.objects.filter(
            group=group, status=CheckpointStatus.PENDING
        ).count(),
        "throughput": _throughput_chart(buckets, start),
        "recent_events": list(
            Event.objects.filter(group=group)
            .select_related("actor", "agent", "task")
            .order_by("-seq")[:RECENT_EVENTS]
        ),
    }


def _throughput_chart(buckets: list[int], start) -> dict:
    """Bars for an inline SVG: 20 units per bucket, 60 high."""
    peak = max(buckets) or 1
    bars = []
    for i, count in enumerate(buckets):
        height = round(56 * count / peak) if count else 0
        begins = timezone.localtime(start + timedelta(seconds=i * THROUGHPUT_BUCKET_S))
        bars.append(
            {
                "x": i * 20 + 2,
                "y": 60 - height,
                "height": height,
                "count": count,
                "label": f"{begins:%H:%M}: {count} completed",
            }
        )
    return {"bars": bars, "total": sum(buckets), "peak": max(buckets), "width": 20 * len(buckets)}


def _overview_fragments(data: dict) -> list[str]:
    return [
        _fragment("dashboard/_overview_stats.html", data),
        _fragment("dashboard/_overview_chart.html", data),
        _fragment("dashboard/_overview_events.html", data),
    ]


@live_page("overview")
def overview_live(ctx: LiveContext) -> list[str]:
    if not (ctx.resync or ctx.events):
        return []
    return _overview_fragments(_overview_data(ctx.group))


@dashboard_view
def overview(request: HttpRequest, slug: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    context = live_context(page="overview", group=group)
    context.update(_overview_data(group), role=group.role)
    return render(request, "dashboard/overview.html", context)


# --- members and invites -------------------------------------------------------------------


def _members_data(group: Group, role: str) -> dict:
    members = list(members_of(group=group))
    invites = []
    if role == Role.OWNER:
        invites = list(
            Invite.objects.filter(
                group=group, revoked_at=None, expires_at__gt=timezone.now(), uses__lt=F("max_uses")
            )
            .select_related("created_by")
            .order_by("-created_at", "-id")
        )
    return {
        "group": group,
        "role": role,
        "is_owner": role == Role.OWNER,
        "members": members,
        "owner_count": sum(1 for m in members if m.role == Role.OWNER),
        "invites": invites,
        "roles": Role.choices,
    }


@live_page("members")
def members_live(ctx: LiveContext) -> list[str]:
    if not ctx.resync and not any(e.kind.startswith(MEMBER_PAGE_KINDS) for e in ctx.events):
        return []
    data = {**_members_data(ctx.group, ctx.role), "user": ctx.user}
    return [
        _fragment("dashboard/_members_list.html", data),
        _fragment("dashboard/_invites_list.html", data),
    ]


def _members_page(request: HttpRequest, group: Group, **extra) -> HttpResponse:
    status = extra.pop("status", 200)
    context = live_context(page="members", group=group)
    context.update(_members_data(group, group.role))
    context.setdefault("invite_form", InviteCreateForm())
    context.update(extra)
    return render(request, "dashboard/members.html", context, status=status)


@dashboard_view
def members(request: HttpRequest, slug: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    return _members_page(request, group)


@dashboard_view
@require_POST
def member_role(request: HttpRequest, slug: str, user_id: int) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug, role=Role.OWNER)
    user = member_user_get(group=group, user_id=user_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors_text(form))
    elif (
        perform(
            request,
            lambda: membership_set_role(
                actor=request.user, group=group, user=user, role=form.cleaned_data["role"]
            ),
        )
        is not REFUSED
    ):
        messages.success(request, f"{user.get_username()} is now {form.cleaned_data['role']}.")
    return redirect("dashboard:members", slug=slug)


@dashboard_view
@require_POST
def member_remove(request: HttpRequest, slug: str, user_id: int) -> HttpResponse:
    """Owners remove anyone; a member removing themself leaves (see group_leave)."""
    group = group_with_role_for_user(user=request.user, slug=slug)
    user = member_user_get(group=group, user_id=user_id)
    removed = perform(
        request, lambda: membership_remove(actor=request.user, group=group, user=user)
    )
    if removed is REFUSED:
        return redirect("dashboard:members", slug=slug)
    if user.pk == request.user.pk:
        messages.success(request, f"You left {group.name}.")
        return redirect("dashboard:groups")
    messages.success(request, f"Removed {user.get_username()} from {group.name}.")
    return redirect("dashboard:members", slug=slug)


@dashboard_view
@require_POST
def group_leave(request: HttpRequest, slug: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    left = perform(
        request, lambda: membership_remove(actor=request.user, group=group, user=request.user)
    )
    if left is REFUSED:
        return redirect("dashboard:members", slug=slug)
    messages.success(request, f"You left {group.name}.")
    return redirect("dashboard:groups")


@never_cache  # it shows a secret once: kept out of every cache and the history
@dashboard_view
@require_POST
def invite_create_view(request: HttpRequest, slug: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug, role=Role.OWNER)
    form = InviteCreateForm(request.POST)
    if not form.is_valid():
        return _members_page(request, group, invite_form=form, status=400)
    try:
        invite, raw = invite_create(
            actor=request.user,
            group=group,
            role=form.cleaned_data["role"],
            max_uses=form.cleaned_data["max_uses"],
        )
    except (NotFound, Forbidden):
        raise
    except DomainError as error:
        form.add_error(None, error.message)
        return _members_page(request, group, invite_form=form, status=400)
    link = request.build_absolute_uri(reverse("dashboard:invite_accept", args=[raw]))
    # Shown once, in this response only: the link is not stored anywhere.
    return _members_page(request, group, new_invite=invite, new_invite_link=link)


@dashboard_view
@require_POST
def invite_revoke_view(request: HttpRequest, slug: str, invite_id: int) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug, role=Role.OWNER)
    invite = Invite.objects.filter(id=invite_id, group=group).first()
    if invite is None:
        raise Http404("No such invite in this group.")
    if perform(request, lambda: invite_revoke(actor=request.user, invite=invite)) is not REFUSED:
        messages.success(request, "The invite link was revoked.")
    return redirect("dashboard:members", slug=slug)


@never_cache  # its URL is the invite's secret
@login_required
@require_http_methods(["GET", "POST"])
def invite_accept_view(request: HttpRequest, token: str) -> HttpResponse:
    """GET shows what the link offers; POST (the button) joins. Signing in comes first."""
    try:
        invite = invite_get_by_token(raw=token)
    except NotFound as error:
        return render(request, "dashboard/invite_accept.html", {"error": error.message}, status=404)
    if request.method == "POST":
        try:
            invite_accept(user=request.user, raw=token)
        except DomainError as error:
            if error.code == "already_member":
                messages.info(request, error.message)
                return redirect("dashboard:overview", slug=invite.group.slug)
            return render(
                request,
                "dashboard/invite_accept.html",
                {"invite": invite, "error": error.message},
                status=error.status,
            )
        messages.success(request, f"Welcome to {invite.group.name}. You are {invite.role}.")
        return redirect("dashboard:overview", slug=invite.group.slug)
    now = timezone.now()
    error = ""
    if invite.revoked_at is not None:
        error = "This invite link was revoked."
    elif invite.expires_at <= now:
        error = "This invite link has expired."
    elif invite.uses >= invite.max_uses:
        error = "This invite link was already used."
    already = Membership.objects.filter(group_id=invite.group_id, user_id=request.user.pk).exists()
    return render(
        request,
        "dashboard/invite_accept.html",
        {"invite": invite, "error": error, "already_member": already},
        status=410 if error else 200,
    )


# --- personal API tokens -------------------------------------------------------------------


@never_cache  # it shows a secret once: kept out of every cache and the history
@login_required
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    form = TokenCreateForm(request.POST or None)
    context: dict = {}
    if request.method == "POST" and form.is_valid():
        try:
            token, raw = api_token_create(user=request.user, name=form.cleaned_data["name"])
        except DomainError as error:
            form.add_error("name", error.message)
        else:
            # Shown once, in this response only.
            context.update(new_token=token, new_token_raw=raw)
            form = TokenCreateForm()
    context.update(_cross_group_live(request.user, "nav"))
    context.update(form=form, tokens=list(api_tokens_for_user(user=request.user)))
    return render(request, "dashboard/tokens.html", context, status=400 if form.errors else 200)


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    try:
        api_token_revoke(user=request.user, token_id=token_id)
    except NotFound as error:
        raise Http404(error.message) from None
    messages.success(request, "The token was revoked.")
    return redirect("dashboard:tokens")


# --- agents and devices --------------------------------------------------------------------


def _agents_data(group: Group, role: str) -> dict:
    agents = list(Agent.objects.filter(group=group).select_related("device").order_by("name", "id"))
    work = defaultdict(list)
    for attempt in (
        Attempt.objects.filter(task__group=group, status__in=LIVE_ATTEMPT_STATUSES)
        .select_related("task")
        .order_by("id")
    ):
        work[attempt.agent_id].append(attempt)
    for agent in agents:
        agent.current = work.get(agent.id, [])
        agent.toolkit_list = sorted(agent.toolkits)
        finished = agent.succeeded_count + agent.failed_count
        agent.success_pct = round(100 * agent.succeeded_count / finished) if finished else None
    devices = list(
        Device.objects.filter(group=group).annotate(agent_count=Count("agents")).order_by("name")
    )
    return {
        "group": group,
        "role": role,
        "is_owner": role == Role.OWNER,
        "agents": agents,
        "devices": devices,
    }


@live_page("agents")
def agents_live(ctx: LiveContext) -> list[str]:
    if not ctx.resync and not any(e.kind.startswith(AGENT_PAGE_KINDS) for e in ctx.events):
        return []
    data = _agents_data(ctx.group, ctx.role)
    return [
        _fragment("dashboard/_agents_table.html", data),
        _fragment("dashboard/_devices_table.html", data),
    ]


def _agents_page(request: HttpRequest, group: Group, **extra) -> HttpResponse:
    context = live_context(page="agents", group=group)
    context.update(_agents_data(group, group.role))
    context.update(extra)
    return render(request, "dashboard/agents.html", context)


@dashboard_view
def agents(request: HttpRequest, slug: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    return _agents_page(request, group)


def pair_command(*, server: str, code: str) -> str:
    return f"claw device pair --server {server} --code {code}"


@never_cache  # it shows a secret once: kept out of every cache and the history
@dashboard_view
@require_POST
def pairing_code_create_view(request: HttpRequest, slug: str) -> HttpResponse:
    import segno

    group = group_with_role_for_user(user=request.user, slug=slug, role=Role.OWNER)
    pairing, raw = pairing_code_create(actor=request.user, group=group)
    command = pair_command(server=request.build_absolute_uri("/").rstrip("/"), code=raw)
    qr = segno.make(command, error="m").svg_inline(scale=4, border=2, title="Pairing command")
    # Shown once, in this response only: only the code's hash is stored.
    return _agents_page(
        request,
        group,
        pairing={"code": raw, "expires_at": pairing.expires_at, "command": command, "qr": qr},
    )


@dashboard_view
@require_POST
def device_revoke_view(request: HttpRequest, slug: str, device_id: int) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    device = device_get_for_user(user=request.user, device_id=device_id)
    if device.group_id != group.id:
        raise Http404("No such device in this group.")
    if perform(request, lambda: device_revoke(actor=request.user, device=device)) is not REFUSED:
        messages.success(request, f"Revoked {device.name}; its agents are offline.")
    return redirect("dashboard:agents", slug=slug)


def _set_draining(request: HttpRequest, slug: str, target, set_draining) -> HttpResponse:
    """A device or agent of this group stops taking work (draining=1) or takes it again."""
    group = group_with_role_for_user(user=request.user, slug=slug)
    if target.group_id != group.id:
        raise Http404("No such device or agent in this group.")
    form = DrainForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors_text(form))
    elif perform(request, lambda: set_draining(form.cleaned_data["draining"])) is not REFUSED:
        state = "draining: no new work" if form.cleaned_data["draining"] else "taking work again"
        messages.success(request, f"{target.name} is {state}.")
    return redirect("dashboard:agents", slug=slug)


@dashboard_view
@require_POST
def device_drain_view(request: HttpRequest, slug: str, device_id: int) -> HttpResponse:
    device = device_get_for_user(user=request.user, device_id=device_id)
    return _set_draining(
        request,
        slug,
        device,
        lambda draining: device_set_draining(actor=request.user, device=device, draining=draining),
    )


@dashboard_view
@require_POST
def agent_drain_view(request: HttpRequest, slug: str, agent_id: int) -> HttpResponse:
    agent = agent_get_for_user(user=request.user, agent_id=agent_id)
    return _set_draining(
        request,
        slug,
        agent,
        lambda draining: agent_set_draining(actor=request.user, agent=agent, draining=draining),
    )
