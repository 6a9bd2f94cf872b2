"""`claw up` end to end: embedded mode in one process, services mode as supervised
children on real PostgreSQL and Redis. Each test starts real servers on free ports."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync

from claw.embedded import InProcessChannelLayer, set_home_loop
from tests.live import BIN, Browser, child_env, dedicated_services, free_port, running
from tests.live import wait_healthy as _wait_healthy

CLAW = str(BIN / "claw")
WORK_STATE = [
    "SELECT id, title, status, epoch, required_toolkits FROM tasks_task ORDER BY id",
    "SELECT id, task_id, agent_id, status, epoch, offered_at, ended_at FROM tasks_attempt",
    "SELECT id, name, status, capacity, toolkits, last_heartbeat_at FROM devices_agent",
]


def work_state(env: dict[str, str]) -> str:
    """Tasks, attempts and agents as the services database has them: what a stalled demo
    was waiting for."""
    url = env["CLAW_DATABASE_URL"]
    try:
        runs = [
            subprocess.run(["psql", url, "-c", query], capture_output=True, text=True)
            for query in WORK_STATE
        ]
    except OSError as exc:  # no psql here: the failure itself must still show
        return f"(work state not read: {exc})"
    return "\n".join(run.stdout + run.stderr for run in runs)


@pytest.fixture(scope="module")
def embedded_env(tmp_path_factory) -> dict[str, str]:
    """One data dir for the module's embedded runs: only the first one migrates."""
    return child_env(
        CLAW_DATA_DIR=str(tmp_path_factory.mktemp("embedded") / "data"),
        CLAW_BEAT_TICK_SECONDS="1",
        CLAW_DATABASE_URL=None,
        CLAW_REDIS_URL=None,
    )


@pytest.fixture(scope="module")
def services_env(tmp_path_factory):
    with dedicated_services("services", tmp_path_factory.mktemp("services")) as services:
        yield child_env(**services)


def test_claw_without_a_command_prints_the_commands():
    result = subprocess.run(
        [CLAW], env=child_env(), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "up" in result.stderr and "start the platform" in result.stderr


@pytest.mark.slow
def test_embedded_mode_serves_runs_worker_and_beat_and_stops_on_sigterm(embedded_env):
    """The `make up` path: demo login printed, worker and beat ticking, SIGTERM stops it;
    a second `claw up --demo` keeps the data, replaces the password, and stops on Ctrl-C."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running("claw up", [CLAW, "up", "--demo", "--port", str(port)], embedded_env) as claw:
        claw.wait_for(r"Claw is running \(embedded mode\)", timeout=40)
        username = claw.wait_for(r"Username: (\S+)", timeout=1).group(1)
        password = claw.wait_for(r"Password: (\S+)", timeout=1).group(1)

        # Healthy means beat ticked and the in-process worker ran the tick task.
        body = _wait_healthy(base, 20, claw)
        assert body["mode"] == "embedded"
        assert all(component["ok"] for component in body["components"].values()), body
        assert body["components"]["database"]["engine"] == "sqlite"
        assert body["components"]["broker"]["transport"] == "memory"
        assert body["components"]["workers"]["seen"][0].startswith("embedded@")

        browser = Browser(base)
        status, page, url = browser.get("/")
        assert status == 200 and url.startswith(base + "/login/")
        assert 'name="password"' in page and 'name="csrfmiddlewaretoken"' in page
        assert "/static/vendor/htmx-2.0.4.min.js" in page

        browser.sign_in(username, password)
        status, page, url = browser.get("/")
        assert status == 200 and url == base + "/groups/"
        assert "Demo group" in page

        status, script, _ = browser.get("/static/vendor/htmx-2.0.4.min.js")
        assert status == 200 and "htmx" in script

        # DEBUG is off by default: a missing page is a plain 404, not Django's debug page.
        status, page, _ = browser.get("/no-such-page/")
        assert status == 404 and "URLconf" not in page and "DEBUG = True" not in page

        # Three demo agents (separate processes, three paired devices) run the demo graph:
        # the matcher on the embedded worker assigns each task to the agent whose toolkits
        # cover it, and the report waits for the other two.
        claw.wait_for(r"demo complete", timeout=60)
        status, body, _ = browser.get("/api/v1/groups/demo/tasks?limit=200")
        tasks = json.loads(body)["items"]
        assert status == 200 and len(tasks) >= 3
        assert {t["status"] for t in tasks[:3]} == {"succeeded"}
        status, body, _ = browser.get("/api/v1/groups/demo/agents")
        agents = {a["name"]: a for a in json.loads(body)}
        assert set(agents) == {"demo-laptop-agent", "demo-cloud-agent", "demo-phone-agent"}
        assert sum(a["succeeded_count"] for a in agents.values()) >= 3

        seconds = claw.terminate(timeout=10)
        assert claw.popen.returncode == 0, claw.output()
        assert seconds < 8, f"took {seconds:.1f}s to stop"

    # Again on the same data: the demo is not duplicated and only the new password works.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running("claw up", [CLAW, "up", "--demo", "--port", str(port)], embedded_env) as claw:
        claw.wait_for(r"Claw is running", timeout=40)
        new_password = claw.wait_for(r"Password: (\S+)", timeout=1).group(1)
        assert new_password != password
        with pytest.raises(AssertionError, match="sign-in failed"):
            Browser(base).sign_in(username, password)
        browser = Browser(base)
        browser.sign_in(username, new_password)
        assert browser.get("/")[1].count(">Demo group</a>") == 1
        claw.terminate(timeout=10, signum=signal.SIGINT)  # Ctrl-C
        assert claw.popen.returncode == 0, claw.output()


@pytest.mark.slow
def test_embedded_mode_exits_when_the_port_is_taken(embedded_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with running("claw up", [CLAW, "up", "--port", str(port)], embedded_env) as claw:
            claw.popen.wait(40)
            assert claw.popen.returncode == 1, claw.output()
            claw.wait_for(rf"could not listen on 127.0.0.1:{port}", timeout=5)


def test_a_bad_setting_stops_claw_up_with_the_variable_named(embedded_env):
    env = {**embedded_env, "CLAW_REDIS_URL": "http://nope"}
    result = subprocess.run(
        [CLAW, "up"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "configuration error: CLAW_REDIS_URL" in result.stderr


def test_demo_is_refused_in_production(embedded_env):
    env = {
        **embedded_env,
        "CLAW_PRODUCTION": "1",
        "CLAW_SECRET_KEY": "x" * 60,
        "CLAW_ALLOWED_HOSTS": "claw.example.com",
    }
    result = subprocess.run(
        [CLAW, "up", "--demo"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "--demo prints a password; it is refused when CLAW_PRODUCTION=1" in result.stderr


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_services_mode_supervises_daphne_worker_and_beat(services_env):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running("claw up", [CLAW, "up", "--demo", "--port", str(port)], services_env) as claw:
        claw.wait_for(r"Claw is running \(services mode\)", timeout=40)
        password = claw.wait_for(r"Password: (\S+)", timeout=1).group(1)
        body = _wait_healthy(base, 40, claw)
        assert body["mode"] == "services"
        assert body["components"]["database"]["engine"] == "postgresql"
        assert body["components"]["channel_layer"]["backend"] == "RedisChannelLayer"
        assert body["components"]["broker"]["transport"] == "redis"
        children = _children_of(claw.popen.pid)
        agents = [command for command in children.values() if "claw.device" in command]
        assert len(children) == 6 and len(agents) == 3, children  # web, worker, beat + 3

        browser = Browser(base)
        browser.sign_in("demo", password)
        assert "Demo group" in browser.get("/")[1]
        # The whole services path: matching on the Celery worker via Redis, offers pushed
        # through the Redis channel layer to agents connected to Daphne.
        try:
            claw.wait_for(r"demo complete", timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{work_state(services_env)}") from None
        # One scrape of the web process adds up the worker's counters too (var/metrics/).
        status, scraped, _ = browser.get("/metrics")
        assert status == 200, scraped
        assert re.search(r"^claw_sweep_duration_seconds_count [1-9]", scraped, re.M), scraped
        assert re.search(r'^claw_agent_frames_total\{type="hello"\} [1-9]', scraped, re.M)

        claw.terminate(timeout=25)
        assert claw.popen.returncode == 0, claw.output()
        assert not any(_alive(pid) for pid in children), claw.output()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_services_mode_stops_everything_when_a_child_dies(services_env):
    port = free_port()
    with running("claw up", [CLAW, "up", "--port", str(port)], services_env) as claw:
        claw.wait_for(r"Claw is running \(services mode\)", timeout=40)
        children = _children_of(claw.popen.pid)
        beat = next(pid for pid, command in children.items() if " beat " in command)
        os.kill(beat, signal.SIGKILL)
        claw.popen.wait(25)
        assert claw.popen.returncode == 1
        claw.wait_for(r"beat exited with status -9; stopping", timeout=1)
        time.sleep(0.2)
        assert not any(_alive(pid) for pid in children), claw.output()


def test_the_in_process_layer_delivers_a_worker_threads_broadcast_to_the_server_loop():
    """A Celery task in the embedded worker broadcasts from its own thread and loop; the
    socket's queue lives on the server loop. Plain InMemoryChannelLayer never wakes that
    loop up (asyncio is not thread-safe); this layer hands the call over."""
    layer = InProcessChannelLayer()
    server_loop = asyncio.new_event_loop()
    server_thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    server_thread.start()
    set_home_loop(server_loop)
    try:

        async def join() -> str:
            channel = await layer.new_channel()
            await layer.group_add("group.1", channel)
            return channel

        channel = asyncio.run_coroutine_threadsafe(join(), server_loop).result(5)
        received = asyncio.run_coroutine_threadsafe(layer.receive(channel), server_loop)
        async_to_sync(layer.group_send)("group.1", {"type": "event.appended", "seq": 7})
        assert received.result(5) == {"type": "event.appended", "seq": 7}
    finally:
        set_home_loop(None)
        server_loop.call_soon_threadsafe(server_loop.stop)
        server_thread.join(5)
        server_loop.close()


def test_without_a_running_home_loop_the_layer_is_the_plain_in_memory_one():
    layer = InProcessChannelLayer()
    stopped = asyncio.new_event_loop()
    set_home_loop(stopped)  # set but not running: `claw up` is shutting down
    try:

        async def roundtrip() -> dict:
            channel = await layer.new_channel()
            await layer.send(channel, {"type": "ping"})
            return await layer.receive(channel)

        assert async_to_sync(roundtrip)() == {"type": "ping"}
    finally:
        set_home_loop(None)
        stopped.close()


@pytest.mark.django_db
def test_home_lists_only_the_signed_in_users_groups_and_sign_out_returns_to_login(client, personas):
    assert client.get("/").url == "/login/?next=/"
    client.force_login(personas.outsider)
    page = client.get("/", follow=True).content.decode()
    assert "Elsewhere" in page and "Research" not in page
    assert client.get("/login/").url == "/"  # already signed in

    response = client.post("/logout/")
    assert response.status_code == 302 and response.url == "/login/"
    assert client.get("/").status_code == 302


def _children_of(pid: int) -> dict[int, str]:
    children = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                children[int(proc.name)] = (proc / "cmdline").read_text().replace("\0", " ")
        except (OSError, IndexError, ValueError):
            continue
    return children


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
