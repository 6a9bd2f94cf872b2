"""The Toolkits page: the toolkits a group works with, each with its current skill (what
agents read when a task requires the toolkit), its version history, a document upload (K2.6
turns it into the skill: apps.devices.skills) and an editor. Live page "toolkits": a
version that becomes ready or fails is redrawn in place; the forms are never redrawn, so
nothing a person is typing is lost (the editor opens with `?edit=SLUG`, fresh)."""

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.db.models import F, Window
from django.db.models.functions import RowNumber
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from apps.dashboard.access import REFUSED, dashboard_view, perform
from apps.dashboard.forms import form_errors_text
from apps.dashboard.live import LiveContext, live_context, live_page
from apps.dashboard.previews import render_markdown
from apps.devices.models import SkillStatus, Toolkit, ToolkitSkill
from apps.devices.skills import (
    MAX_DOCUMENT_BYTES,
    MAX_SKILL_CHARS,
    SKILL_EDITOR_ROLE,
    latest_ready_version,
    skill_document_upload,
    skill_edit,
    toolkit_get,
    toolkits_for_group,
)
from apps.groups.models import Group, Role
from apps.groups.selectors import group_with_role_for_user
from claw import llm
from claw.errors import DomainError, Forbidden, NotFound

VERSIONS_SHOWN = 10  # per toolkit; older versions stay in the API's list
# A generation still pending after this (past claw.skill_generate's time limit) was lost.
STALLED_AFTER = timedelta(minutes=25)
SKILL_PAGE_KINDS = ("skill.",)


class SkillUploadForm(forms.Form):
    document = forms.FileField(
        help_text="Markdown, text or PDF, at most 2 MiB. K2.6 turns it into the skill."
    )


class SkillEditForm(forms.Form):
    text = forms.CharField(
        required=False,
        strip=False,  # the service strips, normalizes line ends and checks the length
        widget=forms.Textarea(attrs={"rows": 16}),
        help_text=f"Markdown, at most {MAX_SKILL_CHARS} characters. Saving makes a new version, "
        "current at once; empty clears the skill.",
    )
    base_version = forms.IntegerField(min_value=0, required=False, widget=forms.HiddenInput)


def _can_edit(role: str) -> bool:
    return Role.rank(role) >= Role.rank(SKILL_EDITOR_ROLE)


def _toolkits_data(group: Group, role: str) -> dict:
    """Every toolkit of the group with its current skill and its last VERSIONS_SHOWN
    versions: five queries, however many toolkits and versions there are."""
    toolkits = toolkits_for_group(group=group)
    current = {
        skill.toolkit_id: skill
        for skill in ToolkitSkill.objects.filter(
            group=group, toolkit__in=toolkits, version=latest_ready_version()
        )
        .defer("document_text")
        .select_related("created_by")
    }
    versions: dict[int, list[ToolkitSkill]] = {}
    for skill in (
        ToolkitSkill.objects.filter(group=group, toolkit__in=toolkits)
        .defer("document_text", "usage")
        .select_related("created_by")
        .annotate(
            rank=Window(RowNumber(), partition_by=[F("toolkit_id")], order_by=F("version").desc())
        )
        .filter(rank__lte=VERSIONS_SHOWN)
        .order_by("toolkit_id", "-version")
    ):
        versions.setdefault(skill.toolkit_id, []).append(skill)
    stalled_before = timezone.now() - STALLED_AFTER
    entries = []
    for toolkit in toolkits:
        skill = current.get(toolkit.id)
        shown = versions.get(toolkit.id, [])
        newest = shown[0] if shown else None
        entries.append(
            {
                "toolkit": toolkit,
                "current": skill,
                "html": render_markdown(skill.text) if skill and skill.text else "",
                "versions": shown,
                "pending": [
                    {"skill": s, "stalled": s.created_at < stalled_before}
                    for s in shown
                    if s.status == SkillStatus.PENDING
                ],
                # The newest version failed (and nothing newer is ready): say so up front.
                "failed": newest
                if newest is not None
                and newest.status == SkillStatus.FAILED
                and (skill is None or newest.version > skill.version)
                else None,
            }
        )
    return {
        "group": group,
        "role": role,
        "can_edit": _can_edit(role),
        "toolkits": entries,
        "model_configured": llm.configured(),
    }


@live_page("toolkits")
def toolkits_live(ctx: LiveContext) -> list[str]:
    if not ctx.touches(SKILL_PAGE_KINDS):
        return []
    data = _toolkits_data(ctx.group, ctx.role)
    return [
        render_to_string("dashboard/_toolkit_skill.html", {**data, "entry": entry, "oob": True})
        for entry in data["toolkits"]
    ]


def _page(request: HttpRequest, group: Group, *, status: int = 200, **extra) -> HttpResponse:
    context = live_context(page="toolkits", group=group)
    context.update(_toolkits_data(group, group.role))
    editing = extra.pop("editing", None) or request.GET.get("edit", "")
    context.update(
        editing=editing,
        max_document_mib=MAX_DOCUMENT_BYTES // (1024 * 1024),
    )
    if editing and context["can_edit"] and "edit_form" not in extra:
        entry = next((e for e in context["toolkits"] if e["toolkit"].slug == editing), None)
        if entry is not None:
            skill = entry["current"]
            extra["edit_form"] = SkillEditForm(
                initial={
                    "text": skill.text if skill else "",
                    "base_version": skill.version if skill else 0,
                }
            )
    context.update(extra)
    return render(request, "dashboard/toolkits.html", context, status=status)


def _page_url(group: Group, toolkit: Toolkit | None = None) -> str:
    url = reverse("dashboard:toolkits", kwargs={"slug": group.slug})
    return f"{url}#toolkit-{toolkit.slug}" if toolkit is not None else url


@dashboard_view
def toolkits(request: HttpRequest, slug: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    return _page(request, group)


@dashboard_view
@require_POST
def skill_upload_view(request: HttpRequest, slug: str, toolkit: str) -> HttpResponse:
    group = group_with_role_for_user(user=request.user, slug=slug)
    kit = toolkit_get(slug=toolkit)
    form = SkillUploadForm(request.POST, request.FILES)
    if not form.is_valid():
        messages.error(request, f"{kit.slug}: {form_errors_text(form)}")
        return redirect(_page_url(group, kit))
    document = form.cleaned_data["document"]
    skill = perform(
        request,
        lambda: skill_document_upload(
            actor=request.user,
            group=group,
            toolkit=kit,
            name=document.name or "",
            data=document.read(MAX_DOCUMENT_BYTES + 1),
        ),
        prefix=f"{document.name}: ",
    )
    if skill is not REFUSED:
        messages.success(
            request,
            f"Uploaded {skill.document_name}: K2.6 is turning it into the {kit.slug} skill "
            f"(version {skill.version}).",
        )
    return redirect(_page_url(group, kit))


@dashboard_view
@require_POST
def skill_edit_view(request: HttpRequest, slug: str, toolkit: str) -> HttpResponse:
    """Save the editor as a new version. A refusal shows the editor again with the text as
    typed; when someone else changed the skill meanwhile, saving again replaces theirs."""
    group = group_with_role_for_user(user=request.user, slug=slug)
    kit = toolkit_get(slug=toolkit)
    form = SkillEditForm(request.POST)
    if not form.is_valid():
        return _page(request, group, status=400, editing=kit.slug, edit_form=form)
    try:
        skill = skill_edit(
            actor=request.user,
            group=group,
            toolkit=kit,
            text=form.cleaned_data["text"],
            base_version=form.cleaned_data["base_version"],
        )
    except (NotFound, Forbidden):
        raise
    except DomainError as error:
        message, status = error.message, 400
        if error.code == "skill_changed":
            current = error.details["current_version"]
            message = (
                f"Someone saved version {current} of the {kit.slug} skill meanwhile (shown "
                "above). Your text is kept below: saving it again replaces that version."
            )
            status = 409
            form = SkillEditForm(
                initial={"text": form.cleaned_data["text"], "base_version": current}
            )
        return _page(
            request, group, status=status, editing=kit.slug, edit_form=form, edit_error=message
        )
    messages.success(request, f"Saved the {kit.slug} skill as version {skill.version}.")
    return redirect(_page_url(group, kit))
