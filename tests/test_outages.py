"""A real web process while what it depends on is down: /healthz answers at once and
names the part that is down; the API and the pages answer 503, not 500, while PostgreSQL
cannot be reached (behind a TCP proxy that the test stops), and recover when it is back."""

import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse, urlunparse

import pytest

from claw import protocol
from tests.live import (
    PYTHON,
    Browser,
    child_env,
    dedicated_services,
    free_port,
    manage,
    running,
    wait_listening,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

SETUP = """
from django.contrib.auth import get_user_model
from apps.groups.services import api_token_create, group_create
user = get_user_model().objects.create_user(username="owner", password="pw-owner")
group_create(user=user, name="Outages", slug="outages")
print("TOKEN", api_token_create(user=user, name="outages")[1])
"""


def web_command(port: int) -> list[str]:
    return [
        PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port),
        "--websocket-max-message-size", str(protocol.MAX_FRAME_BYTES), "claw.asgi:application",
    ]  # fmt: skip


def get(url: str, headers: dict | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - http://
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with dedicated_services("outages", tmp_path_factory.mktemp("outages")) as services:
        output = manage(services, "shell", "-v", "0", "-c", SETUP)
        token = output.split("TOKEN ", 1)[1].split()[0]
        yield {**services, "token": token}


def test_healthz_answers_at_once_and_names_redis_while_redis_is_down(services):
    port, dead_redis = free_port(), free_port()  # nothing listens on dead_redis
    env = {k: v for k, v in services.items() if k != "token"}
    env["CLAW_REDIS_URL"] = f"redis://127.0.0.1:{dead_redis}/0"
    with running("web", web_command(port), child_env(**env)) as web:
        wait_listening(port, 30, web)
        # The first call also imports the Redis clients and opens the database pool.
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503
        timings = []
        for _ in range(3):
            started = time.monotonic()
            status, _, body = get(f"http://127.0.0.1:{port}/healthz")
            timings.append(time.monotonic() - started)
            components = json.loads(body)["components"]
            assert status == 503, body
            assert components["database"]["ok"] is True
            assert components["channel_layer"]["ok"] is False
            assert components["broker"]["ok"] is False
            assert "connecting" in components["broker"]["error"], body
        assert max(timings) < 1.0, timings


def test_the_api_and_pages_answer_503_while_postgresql_is_down_and_recover(services):
    database = urlparse(services["CLAW_DATABASE_URL"])
    proxy_port, port = free_port(), free_port()
    proxy_command = [
        PYTHON, "-m", "tests.bench.delay_proxy", "--listen", str(proxy_port),
        "--to", f"{database.hostname}:{database.port or 5432}", "--delay-ms", "0",
    ]  # fmt: skip
    proxied = database._replace(netloc=database.netloc.rsplit(":", 1)[0] + f":{proxy_port}")
    env = {k: v for k, v in services.items() if k != "token"}
    env.update(CLAW_DATABASE_URL=urlunparse(proxied), CLAW_DB_POOL_TIMEOUT="1")
    base = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {services['token']}"}
    proxy = running("proxy", proxy_command, child_env())
    with proxy as postgres, running("web", web_command(port), child_env(**env)) as web:
        wait_listening(proxy_port, 10, postgres)
        wait_listening(port, 30, web)
        browser = Browser(base)
        browser.sign_in("owner", "pw-owner")
        status, _, body = get(f"{base}/api/v1/groups", bearer)
        assert status == 200 and "outages" in body, body
        assert browser.get("/groups/")[0] == 200

        postgres.kill()

        status, headers, body = get(f"{base}/api/v1/groups", bearer)
        assert status == 503, body
        assert json.loads(body)["code"] == "database_unavailable"
        assert headers["Retry-After"] == "5"
        status, page, _ = browser.get("/groups/")
        assert status == 503, page
        assert "unavailable" in page

        with running("proxy again", proxy_command, child_env()) as postgres_again:
            wait_listening(proxy_port, 10, postgres_again)
            deadline = time.monotonic() + 30
            while (status := get(f"{base}/api/v1/groups", bearer)[0]) != 200:
                assert time.monotonic() < deadline, f"still {status} after PostgreSQL is back"
                time.sleep(0.5)
            assert browser.get("/groups/")[0] == 200
