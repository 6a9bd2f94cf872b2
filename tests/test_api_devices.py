"""Pairing devices, revoking and draining them, and draining agents."""

from datetime import datetime, timedelta

import time_machine
from django.utils import timezone

from apps.devices.models import Agent, AgentStatus, Device, PairingCode
from apps.devices.services import device_authenticate, pairing_code_create
from apps.events.models import Event
from tests.test_api_support import assert_error, body, client_for, send


def pair(code: str, name: str = "Ada's laptop", **extra):
    return send(client_for(), "POST", "/devices/pair", {"code": code, "name": name, **extra})


def test_an_owner_pairs_a_device_with_a_one_time_code(personas):
    created = send(client_for(personas.owner), "POST", "/groups/research/pairing-codes")
    assert created.status_code == 201
    code = body(created)["code"]

    paired = pair(code, kind="laptop", platform="linux-x86_64")

    assert paired.status_code == 201, paired.content
    data = body(paired)
    assert data["group_id"] == personas.group.id
    assert data["token"].startswith("clawd_")
    assert data["device"]["name"] == "Ada's laptop" and data["device"]["kind"] == "laptop"
    assert data["device"]["token_prefix"] == data["token"][:12]
    device = device_authenticate(raw_token=data["token"])
    assert device is not None and device.id == data["device"]["id"]
    listed = body(send(client_for(personas.viewer), "GET", "/groups/research/devices"))
    assert data["device"]["id"] in [d["id"] for d in listed]
    assert Event.objects.filter(kind="device.paired", group=personas.group).exists()


def test_pairing_codes_are_forgiving_about_case_and_dashes(personas):
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)

    assert pair(code.replace("-", "").lower()).status_code == 201


def test_a_wrong_pairing_code_is_refused(personas):
    before = Device.objects.count()

    assert_error(pair("ZZZZ-ZZZZ"), 401, "invalid_code")
    assert Device.objects.count() == before


def test_a_used_pairing_code_is_refused(personas):
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    assert pair(code).status_code == 201
    before = Device.objects.count()

    assert_error(pair(code, name="Second device"), 401, "code_used")
    assert Device.objects.count() == before


def test_an_expired_pairing_code_is_refused(personas):
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    before = Device.objects.count()

    with time_machine.travel(timezone.now() + timedelta(minutes=11)):
        response = pair(code)

    assert_error(response, 401, "code_expired")
    assert Device.objects.count() == before
    assert PairingCode.objects.get().used_at is None


def test_pairing_code_expiry_is_reported(personas):
    start = timezone.now()

    response = send(client_for(personas.owner), "POST", "/groups/research/pairing-codes")

    expires_at = datetime.fromisoformat(body(response)["expires_at"])
    assert timedelta(minutes=9) < expires_at - start <= timedelta(minutes=10, seconds=5)


def test_an_owner_revokes_a_device_and_its_token_stops_working(personas):
    device = personas.agent.device

    response = send(client_for(personas.owner), "POST", f"/devices/{device.id}/revoke")

    assert response.status_code == 200
    assert body(response)["revoked_at"] is not None
    assert device_authenticate(raw_token=device.raw_token) is None
    assert Agent.objects.get(id=personas.agent.id).status == AgentStatus.OFFLINE
    again = send(client_for(personas.owner), "POST", f"/devices/{device.id}/revoke")
    assert_error(again, 409, "already_revoked")


def test_an_owner_drains_and_undrains_a_device(personas):
    client = client_for(personas.owner)
    device = personas.agent.device

    drained = send(client, "POST", f"/devices/{device.id}/drain", {"draining": True})
    undrained = send(client, "POST", f"/devices/{device.id}/drain", {"draining": False})

    assert body(drained)["draining"] is True
    assert body(undrained)["draining"] is False
    kinds = list(Event.objects.filter(group=personas.group).values_list("kind", flat=True))
    assert kinds[-2:] == ["device.draining", "device.undrained"]


def test_a_device_of_another_group_is_not_found(personas):
    other = personas.other_agent.device

    response = send(client_for(personas.owner), "POST", f"/devices/{other.id}/revoke")

    assert_error(response, 404, "not_found")
    assert Device.objects.get(id=other.id).revoked_at is None


def test_agents_are_listed_with_their_toolkits_and_load(personas):
    response = send(client_for(personas.viewer), "GET", "/groups/research/agents")

    assert response.status_code == 200
    [agent] = body(response)
    assert agent["name"] == "alpha"
    assert agent["toolkits"] == {"shell": "1", "python": "3"}
    assert agent["status"] == "online" and agent["success_rate"] == 0.5


def test_an_owner_drains_an_agent_but_not_an_offline_one(personas):
    client = client_for(personas.owner)

    drained = send(client, "POST", f"/agents/{personas.agent.id}/drain", {"draining": True})
    Agent.objects.filter(id=personas.agent.id).update(status=AgentStatus.OFFLINE)
    offline = send(client, "POST", f"/agents/{personas.agent.id}/drain", {"draining": False})

    assert body(drained)["status"] == "draining"
    assert_error(offline, 409, "offline")
