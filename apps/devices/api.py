"""Devices (pairing, revoke, drain) and the agents running on them."""

from datetime import datetime

from django.http import HttpRequest
from ninja import Field, Router, Schema, Status

from apps.devices.models import AgentStatus, DeviceKind
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
from apps.groups.api import InSchema
from apps.groups.selectors import group_get_for_user

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
def pairing_code_create_view(request: HttpRequest, slug: str):
    group = group_get_for_user(user=request.auth, slug=slug)
    pairing, raw = pairing_code_create(actor=request.auth, group=group)
    return Status(201, {"code": raw, "expires_at": pairing.expires_at})


@router.post("/devices/pair", auth=None, response={201: PairedOut})
def device_pair_view(request: HttpRequest, payload: PairIn):
    """Exchange a pairing code for a device token. No sign-in: the code is the credential."""
    device, raw = device_pair(
        code=payload.code,
        name=payload.name,
        kind=payload.kind,
        platform=payload.platform,
        client=request.META.get("REMOTE_ADDR", ""),
    )
    return Status(201, {"device": device, "group_id": device.group_id, "token": raw})


@router.post("/devices/{int:device_id}/revoke", response=DeviceOut)
def device_revoke_view(request: HttpRequest, device_id: int):
    device = device_get_for_user(user=request.auth, device_id=device_id)
    return device_revoke(actor=request.auth, device=device)


@router.post("/devices/{int:device_id}/drain", response=DeviceOut)
def device_drain(request: HttpRequest, device_id: int, payload: DrainIn):
    device = device_get_for_user(user=request.auth, device_id=device_id)
    return device_set_draining(actor=request.auth, device=device, draining=payload.draining)


@router.get("/groups/{slug}/agents", response=list[AgentOut])
def agent_list(request: HttpRequest, slug: str):
    group = group_get_for_user(user=request.auth, slug=slug)
    return agents_for_group(group=group)


@router.post("/agents/{int:agent_id}/drain", response=AgentOut)
def agent_drain(request: HttpRequest, agent_id: int, payload: DrainIn):
    agent = agent_get_for_user(user=request.auth, agent_id=agent_id)
    return agent_set_draining(actor=request.auth, agent=agent, draining=payload.draining)
