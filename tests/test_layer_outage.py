"""Sockets through a channel-layer outage (apps.events.layer), through the real ASGI app
with WebsocketCommunicator, on a redis-server of the test's own that is stopped and
started again: the socket stays open and its frames keep committing while Redis is down,
and once it is back the socket is in its groups again and gets what the lost pushes said."""

import pytest
from django.conf import settings as django_settings

from apps.devices.services import device_pair, pairing_code_create
from tests.live import Proc, child_env, free_port, wait_listening
from tests.test_agent_protocol import HELLO, call, connected, new_task, next_of_type, offer
from tests.test_dashboard_live import live_seq, new_tasks, page_socket, seq_of

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis, pytest.mark.timeout(60)]


class OwnRedis:
    def __init__(self, tmp_path) -> None:
        self.port, self.tmp = free_port(), tmp_path
        self.proc: Proc | None = None

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.tmp),
        ]  # fmt: skip
        self.proc = Proc("redis", command, child_env())
        wait_listening(self.port, 10, self.proc)

    def stop(self) -> None:
        self.proc.close()  # no persistence: its groups and queued messages are gone


@pytest.fixture
def device(personas):
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    device, token = device_pair(code=code, name="laptop", kind="laptop")
    device.raw_token = token
    return device


@pytest.fixture
def own_redis(tmp_path, settings):
    redis = OwnRedis(tmp_path)
    redis.start()
    layer = django_settings.CHANNEL_LAYERS["default"]
    hosts = [{"address": f"redis://127.0.0.1:{redis.port}/0", "socket_timeout": 30}]
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {**layer.get("CONFIG", {}), "hosts": hosts, "prefix": "outage"},
        }
    }
    try:
        yield redis
    finally:
        redis.stop()


async def test_an_agent_socket_outlives_an_outage_and_then_gets_the_offer_it_missed(
    personas, device, own_redis
):
    async with connected(device.raw_token) as ws:
        agent_id = ws.welcome["agent_id"]
        own_redis.stop()

        beat = await call(ws, {"type": "heartbeat", "id": "b1"})
        assert (beat["type"], beat["re"]) == ("ack", "b1")
        second = {**HELLO, "agent": {**HELLO["agent"], "name": "second"}}
        async with connected(device.raw_token, hello=second) as newcomer:
            assert newcomer.welcome["agent_id"] != agent_id
        missed = await offer(await new_task(personas), agent_id)  # its push is lost
        assert await ws.receive_nothing(timeout=1)

        own_redis.start()
        assignment = await next_of_type(ws, "assignment")
        assert (assignment["attempt_id"], assignment["status"]) == (missed.id, "offered")
        pushed = await offer(await new_task(personas), agent_id)
        assignment = await next_of_type(ws, "assignment")
        assert assignment["attempt_id"] == pushed.id


async def test_a_live_page_outlives_an_outage_and_then_catches_up(personas, own_redis):
    rendered_at = await seq_of(personas.group)
    async with page_socket(
        personas.viewer, "page=overview&group=research", resume=rendered_at
    ) as ws:
        await ws.receive_from(timeout=5)  # the badge, after the resume
        own_redis.stop()
        await new_tasks(personas, 2)  # committed; their messages are lost
        assert await ws.receive_nothing(timeout=1)

        own_redis.start()
        frame = await ws.receive_from(timeout=5)
        assert live_seq(frame) == await seq_of(personas.group)
        await new_tasks(personas, 1)
        frame = await ws.receive_from(timeout=5)
        assert live_seq(frame) == await seq_of(personas.group)
