from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from apps.devices.models import Agent, AgentStatus, Device, PairingCode, Toolkit
from apps.devices.services import (
    agent_heartbeat,
    agent_register,
    agent_set_draining,
    device_authenticate,
    device_pair,
    device_revoke,
    device_set_draining,
    pairing_code_create,
)
from apps.tasks.models import Attempt
from apps.tasks.services import attempt_accept, task_assign, task_create
from claw.errors import Forbidden, InvalidInput, InvalidTransition, Unauthorized


@pytest.fixture
def paired(personas):
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    device, token = device_pair(code=code, name="studio-mac", kind="laptop", platform="macOS 15")
    return device, token


def test_pairing_exchanges_a_one_time_code_for_a_hashed_token(personas, paired):
    device, token = paired
    assert token.startswith("clawd_")
    assert device.token_hash != token and token not in device.token_hash
    assert device_authenticate(raw_token=token) == device
    assert PairingCode.objects.get().device == device


def test_codes_are_forgiving_about_case_and_dashes(personas):
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    device, _ = device_pair(code=code.replace("-", "").lower(), name="phone", kind="phone")
    assert device.kind == "phone"


def test_a_code_works_only_once(personas, paired):
    code_row = PairingCode.objects.get()
    assert code_row.used_at is not None
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    device_pair(code=code, name="a")
    with pytest.raises(Unauthorized) as exc:
        device_pair(code=code, name="b")
    assert exc.value.code == "code_used"
    assert Device.objects.filter(name__in=["studio-mac", "a", "b"]).count() == 2


def test_wrong_and_expired_codes_are_refused(personas):
    with pytest.raises(Unauthorized) as exc:
        device_pair(code="AAAA-BBBB", name="x")
    assert exc.value.code == "invalid_code"
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    with time_machine.travel(timezone.now() + timedelta(minutes=11)):
        with pytest.raises(Unauthorized) as exc:
            device_pair(code=code, name="x")
    assert exc.value.code == "code_expired"
    assert not Device.objects.filter(name="x").exists()


def test_only_owners_create_pairing_codes(personas):
    with pytest.raises(Forbidden):
        pairing_code_create(actor=personas.approver, group=personas.group)


def test_a_revoked_device_token_stops_working(
    personas, paired, broadcasts, django_capture_on_commit_callbacks
):
    device, token = paired
    agent_register(device=device, name="worker", toolkits={"shell": "1"})
    with django_capture_on_commit_callbacks(execute=True):
        device_revoke(actor=personas.owner, device=device)
    assert device_authenticate(raw_token=token) is None
    assert Agent.objects.get(device=device).status == AgentStatus.OFFLINE
    assert (f"device.{device.id}", {"type": "device.revoked"}) in broadcasts
    with pytest.raises(InvalidTransition):
        device_revoke(actor=personas.owner, device=device)


def test_registering_again_updates_the_same_agent(personas, paired):
    device, _ = paired
    first = agent_register(device=device, name="worker", toolkits={"shell": "1"}, capacity=2)
    second = agent_register(
        device=device, name="worker", toolkits={"shell": "2", "gizmo": "0.1"}, capacity=4
    )
    assert first.id == second.id
    second.refresh_from_db()
    assert (second.toolkits, second.capacity, second.status) == (
        {"shell": "2", "gizmo": "0.1"},
        4,
        AgentStatus.ONLINE,
    )
    assert Toolkit.objects.filter(slug="gizmo").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "", "toolkits": {}},
        {"name": "w", "toolkits": {"Bad Slug": "1"}},
        {"name": "w", "toolkits": {"shell": 1}},
        {"name": "w", "toolkits": {}, "capacity": 0},
    ],
)
def test_bad_agent_declarations_are_refused(personas, paired, kwargs):
    with pytest.raises(InvalidInput):
        agent_register(device=paired[0], **kwargs)
    assert not Agent.objects.filter(device=paired[0]).exists()


def test_a_heartbeat_extends_the_leases_of_running_attempts(personas):
    agent = personas.agent
    task = task_create(group=personas.group, actor=personas.member, title="long job")
    attempt = task_assign(task_id=task.id, agent_id=agent.id)
    attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)
    later = timezone.now() + timedelta(seconds=20)
    with time_machine.travel(later):
        assert agent_heartbeat(agent_id=agent.id, lease_timeout_s=30) == 1
    lease = Attempt.objects.get(id=attempt.id).lease_expires_at
    assert lease >= later + timedelta(seconds=personas.group.lease_timeout_s - 1)


def test_a_heartbeat_does_not_extend_an_offer_whose_frame_the_agent_may_never_have_seen(
    personas,
):
    agent = personas.agent
    task = task_create(group=personas.group, actor=personas.member, title="offered")
    offer = task_assign(task_id=task.id, agent_id=agent.id)
    with time_machine.travel(timezone.now() + timedelta(seconds=20)):
        assert agent_heartbeat(agent_id=agent.id, lease_timeout_s=30) == 0
    assert Attempt.objects.get(id=offer.id).lease_expires_at == offer.lease_expires_at


def test_draining_agents_and_devices_is_for_owners(personas):
    with pytest.raises(Forbidden):
        agent_set_draining(actor=personas.member, agent=personas.agent, draining=True)
    agent_set_draining(actor=personas.owner, agent=personas.agent, draining=True)
    personas.agent.refresh_from_db()
    assert personas.agent.status == AgentStatus.DRAINING
    device_set_draining(actor=personas.owner, device=personas.agent.device, draining=True)
    assert Device.objects.get(id=personas.agent.device_id).draining


def test_repeated_wrong_codes_are_throttled_per_client(personas):
    from apps.devices.services import PAIRING_FAILURES_ALLOWED
    from claw.errors import Throttled

    for _ in range(PAIRING_FAILURES_ALLOWED):
        with pytest.raises(Unauthorized):
            device_pair(code="ZZZZ-ZZZZ", name="guess", client="10.0.0.9")
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    with pytest.raises(Throttled) as exc:
        device_pair(code=code, name="even-a-good-code", client="10.0.0.9")
    assert exc.value.status == 429
    device, _ = device_pair(code=code, name="other-client", client="10.0.0.10")
    assert device.name == "other-client"


def test_a_hello_is_a_handful_of_statements(personas):
    """After a server restart a swarm's agents all say hello at once (1,000 agents must be
    welcomed in seconds): registering and the welcome stay a few statements, whatever the
    agent declares."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from apps.devices.selectors import welcome_frame
    from apps.devices.services import agent_connection_opened
    from claw import protocol

    toolkits = {f"kit-{i}": "1" for i in range(8)}
    info = protocol.AgentInfo(name="alpha", toolkits=toolkits, capacity=2)
    limits = protocol.Limits(max_frame_bytes=1, rate_per_s=1, burst=1)
    device_id = personas.agent.device_id
    agent_connection_opened(device_id=device_id, info=info, connection="first")
    with CaptureQueriesContext(connection) as statements:
        agent = agent_connection_opened(device_id=device_id, info=info, connection="second")
        welcome = welcome_frame(agent_id=agent.id, re="h1", version=1, limits=limits)
    assert welcome.agent_id == personas.agent.id
    assert len(statements) <= 12, [q["sql"][:80] for q in statements]
    personas.agent.refresh_from_db()
    assert (personas.agent.connection, personas.agent.toolkits) == ("second", toolkits)
