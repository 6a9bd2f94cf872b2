"""Devices (pairing, revoke, drain), the agents running on them, and the group's toolkit
skills (apps.devices.skills)."""

from datetime import datetime

from django.http import HttpRequest, HttpResponse
from ninja import Field, File, Router, Schema, Status, UploadedFile

from apps.devices.models import AgentStatus, DeviceKind, SkillSource, SkillStatus
from apps.devices.selectors import (
    agent_get_for_user,
    agents_for_group,
    device_get_for_user,
    devices_for_group,
)
from apps.devices.services import (
    agent_set_draining,
    device_pair,
    device_revoke,
    device_set_draining,
    pairing_code_create,
)
from apps.devices.skills import (
    MAX_DOCUMENT_BYTES,
    MAX_SKILL_CHARS,
    skill_document_upload,
    skill_edit,
    skill_versions,
    skills_current,
    toolkit_get,
    toolkits_for_group,
)
from apps.groups.api import InSchema
from apps.groups.selectors import group_get_for_user
from claw.schema import Id, NonNegative

router = Router()


class DeviceOut(Schema):
    id: int
    name: str
    kind: DeviceKind
    platform: str
    token_prefix: str
    paired_at: datetime
    revoked_at: datetime | None
    draining: bool
    last_seen_at: datetime | None


class PairingCodeOut(Schema):
    code: str = Field(description="Give this to the device; single use.")
    expires_at: datetime


class PairIn(InSchema):
    code: str = Field(min_length=1, max_length=20)
    name: str = Field(min_length=1, max_length=100)
    kind: DeviceKind = DeviceKind.OTHER
    platform: str = Field("", max_length=100)


class PairedOut(Schema):
    device: DeviceOut
    group_id: int
    token: str = Field(description="The device token. Shown once; only its hash is stored.")


class DrainIn(InSchema):
    draining: bool


class AgentOut(Schema):
    id: int
    name: str
    device_id: int
    status: AgentStatus
    toolkits: dict[str, str]
    capacity: int
    client_version: str
    last_heartbeat_at: datetime | None
    succeeded_count: int
    failed_count: int
    success_rate: float
    created_at: datetime


@router.get("/groups/{slug}/devices", response=list[DeviceOut])
def device_list(request: HttpRequest, slug: str):
    group = group_get_for_user(user=request.auth, slug=slug)
    return devices_for_group(group=group)


@router.post("/groups/{slug}/pairing-codes", response={201: PairingCodeOut})
def pairing_code_create_view(request: HttpRequest, slug: str, response: HttpResponse):
    group = group_get_for_user(user=request.auth, slug=slug)
    pairing, raw = pairing_code_create(actor=request.auth, group=group)
    response["Cache-Control"] = "no-store"  # the raw code, shown once
    return Status(201, {"code": raw, "expires_at": pairing.expires_at})


@router.post("/devices/pair", auth=None, response={201: PairedOut})
def device_pair_view(request: HttpRequest, payload: PairIn, response: HttpResponse):
    """Exchange a pairing code for a device token. No sign-in: the code is the credential."""
    device, raw = device_pair(
        code=payload.code,
        name=payload.name,
        kind=payload.kind,
        platform=payload.platform,
        client=request.META.get("REMOTE_ADDR", ""),
    )
    response["Cache-Control"] = "no-store"  # the device token, shown once
    return Status(201, {"device": device, "group_id": device.group_id, "token": raw})


@router.post("/devices/{int:device_id}/revoke", response=DeviceOut)
def device_revoke_view(request: HttpRequest, device_id: Id):
    device = device_get_for_user(user=request.auth, device_id=device_id)
    return device_revoke(actor=request.auth, device=device)


@router.post("/devices/{int:device_id}/drain", response=DeviceOut)
def device_drain(request: HttpRequest, device_id: Id, payload: DrainIn):
    device = device_get_for_user(user=request.auth, device_id=device_id)
    return device_set_draining(actor=request.auth, device=device, draining=payload.draining)


@router.get("/groups/{slug}/agents", response=list[AgentOut])
def agent_list(request: HttpRequest, slug: str):
    group = group_get_for_user(user=request.auth, slug=slug)
    return agents_for_group(group=group)


@router.post("/agents/{int:agent_id}/drain", response=AgentOut)
def agent_drain(request: HttpRequest, agent_id: Id, payload: DrainIn):
    agent = agent_get_for_user(user=request.auth, agent_id=agent_id)
    return agent_set_draining(actor=request.auth, agent=agent, draining=payload.draining)


# --- toolkit skills ------------------------------------------------------------------------


class SkillOut(Schema):
    id: int
    toolkit: str
    version: int
    source: SkillSource
    status: SkillStatus = Field(description="pending: the model is making it from the document.")
    text: str
    error: str
    document_name: str
    document_sha256: str
    document_size: int | None
    created_by: str | None
    created_at: datetime
    finished_at: datetime | None

    @staticmethod
    def resolve_toolkit(obj) -> str:
        return obj.toolkit.slug

    @staticmethod
    def resolve_created_by(obj) -> str | None:
        return obj.created_by.get_username() if obj.created_by else None


class ToolkitOut(Schema):
    slug: str
    skill: str = Field(description="The current skill (the latest ready version); may be empty.")


class SkillEditIn(InSchema):
    text: str = Field(
        description=f"Markdown, at most {MAX_SKILL_CHARS} characters; empty clears the skill."
    )
    base_version: NonNegative | None = Field(
        None,
        description="The version you edited (0: none); refused with 409 skill_changed "
        "when another one became current meanwhile.",
    )


@router.get("/groups/{slug}/toolkits", response=list[ToolkitOut])
def toolkit_list(request: HttpRequest, slug: str):
    """The toolkits the group works with (its agents declare, its tasks require, or it has
    skills for), each with its current skill."""
    group = group_get_for_user(user=request.auth, slug=slug)
    slugs = [toolkit.slug for toolkit in toolkits_for_group(group=group)]
    current = skills_current(group_id=group.id, slugs=slugs, budget=None)
    return [{"slug": s, "skill": current.get(s, "")} for s in slugs]


@router.get("/groups/{slug}/toolkits/{toolkit}/skills", response=list[SkillOut])
def skill_list(request: HttpRequest, slug: str, toolkit: str):
    """A toolkit's skill versions in the group, newest first."""
    group = group_get_for_user(user=request.auth, slug=slug)
    return skill_versions(group=group, toolkit=toolkit_get(slug=toolkit))


@router.post("/groups/{slug}/toolkits/{toolkit}/skills", response={201: SkillOut})
def skill_edit_view(request: HttpRequest, slug: str, toolkit: str, payload: SkillEditIn):
    """A new version written by hand (owner); current at once."""
    group = group_get_for_user(user=request.auth, slug=slug)
    skill = skill_edit(
        actor=request.auth,
        group=group,
        toolkit=toolkit_get(slug=toolkit),
        text=payload.text,
        base_version=payload.base_version,
    )
    return Status(201, skill)


@router.post("/groups/{slug}/toolkits/{toolkit}/skills/documents", response={202: SkillOut})
def skill_document_upload_view(
    request: HttpRequest, slug: str, toolkit: str, file: File[UploadedFile]
):
    """Upload a document (.md, .markdown, .txt or .pdf; at most 2 MiB) for K2.6 to turn into
    the toolkit's skill (owner). Answers with the new version, `pending`; it becomes `ready`
    (or `failed`, with the error) when the model is done."""
    group = group_get_for_user(user=request.auth, slug=slug)
    skill = skill_document_upload(
        actor=request.auth,
        group=group,
        toolkit=toolkit_get(slug=toolkit),
        name=file.name or "",
        data=file.read(MAX_DOCUMENT_BYTES + 1),
    )
    return Status(202, skill)
