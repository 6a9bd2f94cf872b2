"""`claw device pair` and `claw agent run` (as `python -m claw.device`) against a real Daphne
on PostgreSQL and Redis: explicit steps, a crash mid-attempt and its resume, a server
restart, a checkpoint decided over the API, a graceful stop, and revocation.

No Celery worker runs here, so tests offer tasks with apps.tasks.services.task_assign
through `manage.py shell`, or a hello does: it matches its agent at once."""

import json
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.live import (
    NO_PROXY_OPENER,
    PYTHON,
    ROOT,
    Proc,
    child_env,
    dedicated_services,
    free_port,
    manage,
    running,
    wait_listening,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SETUP = """
import json
from django.contrib.auth import get_user_model
from apps.groups.models import Role
from apps.groups.services import api_token_create, group_create, membership_add
User = get_user_model()
alice = User.objects.create_user("alice", password="alice-pw-123")
bob = User.objects.create_user("bob", password="bob-pw-123")
group = group_create(user=alice, name="Devs", slug="devs", heartbeat_interval_s=2)
membership_add(actor=alice, group=group, user=bob, role=Role.APPROVER)
print(json.dumps({
    "alice": api_token_create(user=alice, name="e2e")[1],
    "bob": api_token_create(user=bob, name="e2e")[1],
}))
"""

ASSIGN = """
from apps.tasks.models import Attempt
from apps.tasks.services import task_assign
from claw.errors import InvalidTransition
for task_id in {task_ids!r}:
    try:
        task_assign(task_id=task_id, agent_id={agent_id})
    except InvalidTransition:
        # A hello matches its agent at once: a task created before it connected is its own
        # (offered, running, or done already).
        latest = Attempt.objects.filter(task_id=task_id).order_by("-id").first()
        assert latest is not None and latest.agent_id == {agent_id}, task_id
"""

TERMINAL = {"succeeded", "failed", "cancelled", "blocked"}


class Server:
    """Daphne on a dedicated database; restartable on the same port."""

    def __init__(self, services: dict[str, str], tokens: dict[str, str]):
        self.services, self.tokens = services, tokens
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = child_env(DJANGO_SETTINGS_MODULE="claw.settings", **services)
        self.procs: list[Proc] = []

    def start(self) -> None:
        command = [PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(self.port)]
        daphne = Proc("daphne", [*command, "claw.asgi:application"], self.env)
        self.procs.append(daphne)
        wait_listening(self.port, 30, daphne)

    def stop(self) -> None:
        if self.procs:
            self.procs[-1].close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def api(self, method: str, path: str, body: dict | None = None, *, user: str = "alice"):
        request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1
            f"{self.base}/api/v1{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={
                "Authorization": f"Bearer {self.tokens[user]}",
                "Content-Type": "application/json",
            },
        )
        try:
            with NO_PROXY_OPENER.open(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def create_task(self, title: str, steps: list | None = None, **extra) -> int:
        status, task = self.api(
            "POST", "/groups/devs/tasks", {"title": title, "steps": steps or [], **extra}
        )
        assert status == 201, task
        return task["id"]

    def assign(self, agent_id: int, *task_ids: int) -> None:
        code = ASSIGN.format(task_ids=list(task_ids), agent_id=agent_id)
        manage(self.services, "shell", "-v", "0", "-c", code)

    def task(self, task_id: int) -> dict:
        status, task = self.api("GET", f"/tasks/{task_id}")
        assert status == 200, task
        return task

    def wait_task(self, task_id: int, statuses: set[str], timeout: float, *procs: Proc) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.task(task_id)
            if task["status"] in statuses:
                return task
            time.sleep(0.1)
        outputs = "\n".join(p.output() for p in (*procs, self.procs[-1]))
        raise AssertionError(f"task {task_id} is {task['status']}, not {statuses}\n{outputs}")

    def events(self, task_id: int, kind: str | None = None) -> list[dict]:
        found, after = [], 0
        while True:
            status, page = self.api("GET", f"/groups/devs/events?after={after}&limit=500")
            assert status == 200, page
            found += [e for e in page["items"] if e["refs"]["task_id"] == task_id]
            if not page["items"]:
                break
            after = page["next_after"]
        return [e for e in found if kind is None or e["kind"] == kind]

    def wait_event(self, task_id: int, kind: str, predicate, timeout: float, proc: Proc) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(task_id, kind):
                if predicate(event):
                    return event
            time.sleep(0.1)
        raise AssertionError(f"no {kind} event for task {task_id}\n{proc.output()}")


@pytest.fixture(autouse=True)
def nothing_left_to_match(request):
    """A hello matches its agent at once: a task an earlier test left unfinished would be
    offered to the next test's agent. Each test leaves none."""
    yield
    if "server" not in request.fixturenames:
        return
    server = request.getfixturevalue("server")
    for status in ("waiting", "ready", "assigned", "running", "review", "blocked"):
        code, page = server.api("GET", f"/groups/devs/tasks?status={status}&limit=200")
        assert code == 200, page
        for task in page["items"]:
            server.api("POST", f"/tasks/{task['id']}/cancel", {"reason": "test over"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with dedicated_services("device", tmp_path_factory.mktemp("device")) as services:
        output = manage(services, "shell", "-v", "0", "-c", SETUP)
        server = Server(services, json.loads(output.strip().splitlines()[-1]))
        server.start()
        try:
            yield server
        finally:
            server.stop()
        tracebacks = [
            p.output() for p in server.procs if any("Traceback" in line for line in p.lines)
        ]
        assert not tracebacks, "\n".join(tracebacks)


def device_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "claw.device", *args],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def pair(server: Server, config: Path, name: str) -> dict:
    status, created = server.api("POST", "/groups/devs/pairing-codes")
    assert status == 201, created
    result = device_cli(
        "device", "pair", "--server", server.base, "--code", created["code"],
        "--name", name, "--kind", "laptop", "--config", str(config),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return {"code": created["code"], "stdout": result.stdout, **json.loads(config.read_text())}


def agent(config: Path, name: str, *toolkits: str, extra: tuple[str, ...] = ()):
    command = [
        PYTHON, "-m", "claw.device", "agent", "run", "--name", name, "--config", str(config),
        "--grace", "3", *[arg for slug in toolkits for arg in ("--toolkit", slug)], *extra,
    ]  # fmt: skip
    return running(f"agent {name}", command, child_env())


def connected(proc: Proc, times: int = 1, timeout: float = 20) -> int:
    """Wait for the agent's n-th welcome; returns its agent id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in list(proc.lines) if " as agent " in line]
        if len(lines) >= times:
            return int(lines[-1].split(" as agent ")[1].split()[0])
        if proc.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"not connected {times} time(s)\n{proc.output()}")


def test_pairing_writes_a_0600_config_and_explains_a_refused_code(server, tmp_path):
    config = tmp_path / "conf" / "device.json"
    paired = pair(server, config, "ada-laptop")
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert paired["server"] == server.base and paired["token"].startswith("clawd_")
    assert paired["name"] == "ada-laptop" and paired["kind"] == "laptop"
    assert f"Paired device 'ada-laptop' (id {paired['device_id']})" in paired["stdout"]

    again = device_cli(
        "device", "pair", "--server", server.base, "--code", paired["code"], "--name", "x",
        "--config", str(tmp_path / "other.json"),
    )  # fmt: skip
    assert again.returncode == 1
    assert "pairing failed: This pairing code was already used. (code_used)" in again.stderr
    assert not (tmp_path / "other.json").exists()

    no_config = device_cli("agent", "run", "--name", "a", "--config", str(tmp_path / "none"))
    assert no_config.returncode == 2 and "Pair this device first" in no_config.stderr


def test_an_agent_runs_explicit_steps_and_declines_tasks_without_steps(server, tmp_path):
    config = tmp_path / "device.json"
    pair(server, config, "runner-box")
    workdir = tmp_path / "work"
    with agent(config, "a1", "shell", "files", extra=("--workdir", str(workdir))) as proc:
        agent_id = connected(proc)
        steps = [
            {"tool": "files.write", "args": {"path": "notes/hello.txt", "content": "hi there"}},
            {"tool": "shell", "args": {"cmd": "wc -c < notes/hello.txt"}},
            {"tool": "files.read", "args": {"path": "notes/hello.txt"}},
        ]
        task_id = server.create_task("explicit steps", steps)
        no_steps = server.create_task("think about it", instructions="write a poem")
        server.assign(agent_id, task_id)
        task = server.wait_task(task_id, TERMINAL, 20, proc)
        server.assign(agent_id, no_steps)
        declined = server.wait_task(no_steps, {"ready"}, 10, proc)
        while not declined["attempts"] or declined["attempts"][0]["status"] != "declined":
            time.sleep(0.1)
            declined = server.task(no_steps)

    assert task["status"] == "succeeded", task
    assert (workdir / "notes" / "hello.txt").read_text() == "hi there"
    outputs = [step["output"] for step in task["result"]["steps"]]
    assert outputs[1]["stdout"].strip() == "8" and outputs[2]["content"] == "hi there"
    progress = server.events(task_id, "progress.step")
    assert [(e["payload"]["seq"], e["payload"]["index"]) for e in progress] == [
        (1, 0),
        (2, 1),
        (3, 2),
    ]
    assert progress[1]["payload"]["tool"] == "shell" and progress[1]["payload"]["ok"] is True
    assert progress[1]["payload"]["args"] == {"cmd": "wc -c < notes/hello.txt"}
    assert "no model runtime yet" in declined["attempts"][0]["failure_reason"]

    # The device token is a secret: neither the agent nor the server ever logs it.
    token = json.loads(config.read_text())["token"]
    logs = proc.lines + [line for server_proc in server.procs for line in server_proc.lines]
    assert logs and not any(token in line or token[6:] in line for line in logs)


def test_an_agent_killed_mid_attempt_resumes_what_it_still_owns(server, tmp_path):
    config = tmp_path / "device.json"
    pair(server, config, "crashy")
    steps = [
        {"tool": "shell", "args": {"cmd": "echo one >> log"}},
        {"tool": "shell", "args": {"cmd": "sleep 3; echo two >> log"}},
        {"tool": "shell", "args": {"cmd": "cat log"}},
    ]
    task_id = server.create_task("survive a crash", steps)
    with agent(config, "a2", "shell") as proc:
        agent_id = connected(proc)
        server.assign(agent_id, task_id)
        server.wait_event(task_id, "progress.step", lambda e: e["payload"]["index"] == 0, 15, proc)
        proc.kill()  # SIGKILL, mid `sleep 3`
    assert server.task(task_id)["status"] == "running"

    with agent(config, "a2", "shell") as proc:
        connected(proc)
        task = server.wait_task(task_id, TERMINAL, 20, proc)
        assert any("resuming at step 1 (journal)" in line for line in proc.lines), proc.output()

    assert task["status"] == "succeeded", task
    assert [a["status"] for a in task["attempts"]] == ["succeeded"]
    assert task["result"]["steps"][2]["output"]["stdout"] == "one\ntwo\n"  # step 0 ran once
    progress = server.events(task_id, "progress.step")
    assert [(e["payload"]["seq"], e["payload"]["index"]) for e in progress] == [
        (1, 0),
        (2, 1),
        (3, 2),
    ]


def test_the_agent_reconnects_when_the_server_restarts_and_keeps_working(server, tmp_path):
    config = tmp_path / "device.json"
    pair(server, config, "steady")
    steps = [
        # Long enough for the server to be stopped while it runs (a loaded machine once
        # took more than 1.5 s to stop it, and the whole task finished before it was down).
        {"tool": "shell", "args": {"cmd": "sleep 4"}},
        {"tool": "shell", "args": {"cmd": "echo after"}},
    ]
    task_id = server.create_task("across a server restart", steps)
    with agent(config, "a3", "shell") as proc:
        agent_id = connected(proc)
        server.assign(agent_id, task_id)
        proc.wait_for(r"step 0: shell", 10)
        server.stop()
        proc.wait_for(r"connection lost \(close code 1006", 10)
        proc.wait_for(r"step 0 \(shell\) done", 10)  # finished while the server was down
        server.start()
        assert connected(proc, times=2, timeout=30) == agent_id
        task = server.wait_task(task_id, TERMINAL, 20, proc)
        proc.wait_for(r"resending 1 unanswered frame", 1)  # step 0's progress

    assert task["status"] == "succeeded", task
    progress = server.events(task_id, "progress.step")
    assert [e["payload"]["index"] for e in progress] == [0, 1]  # each step reported once


def test_a_checkpoint_step_waits_for_a_human_decision(server, tmp_path):
    config = tmp_path / "device.json"
    pair(server, config, "careful")

    def steps(title):
        return [
            {"tool": "shell", "args": {"cmd": "echo prepared"}},
            {"tool": "checkpoint", "args": {"title": title, "options": ["ship", "hold"]}},
            {"tool": "shell", "args": {"cmd": "echo shipped"}},
        ]

    approved = server.create_task("ship v1", steps("Ship v1?"))
    rejected = server.create_task("ship v2", steps("Ship v2?"))
    with agent(config, "a4", "shell", extra=("--capacity", "2")) as proc:
        agent_id = connected(proc)
        server.assign(agent_id, approved, rejected)
        pending = {}
        deadline = time.monotonic() + 15
        while len(pending) < 2 and time.monotonic() < deadline:
            _, page = server.api("GET", "/groups/devs/checkpoints?status=pending")
            pending = {
                c["task_id"]: c for c in page["items"] if c["task_id"] in (approved, rejected)
            }
            time.sleep(0.1)
        assert len(pending) == 2, proc.output()
        assert pending[approved]["options"] == ["ship", "hold"]
        assert server.task(approved)["status"] == "running"

        status, decided = server.api(
            "POST",
            f"/checkpoints/{pending[approved]['id']}/decide",
            {"verdict": "approve"},
            user="bob",
        )
        assert status == 200 and decided["status"] == "approved", decided
        status, decided = server.api(
            "POST",
            f"/checkpoints/{pending[rejected]['id']}/decide",
            {"verdict": "reject", "note": "not today"},
            user="bob",
        )
        assert status == 200 and decided["status"] == "rejected", decided
        done = server.wait_task(approved, TERMINAL, 15, proc)
        failed = server.wait_task(rejected, TERMINAL, 15, proc)

    assert done["status"] == "succeeded", done
    assert done["result"]["steps"][2]["output"]["stdout"] == "shipped\n"
    checkpoint_step = server.events(approved, "progress.step")[1]["payload"]
    assert checkpoint_step["tool"] == "checkpoint"
    assert checkpoint_step["output"]["status"] == "approved"
    assert failed["status"] == "failed", failed
    attempt = failed["attempts"][0]
    assert attempt["retryable"] is False
    assert "checkpoint rejected: not today" in attempt["failure_reason"]


def test_sigterm_finishes_work_within_the_grace_period_and_fails_the_rest(server, tmp_path):
    config = tmp_path / "device.json"
    pair(server, config, "draining")
    quick = server.create_task("quick", [{"tool": "shell", "args": {"cmd": "sleep 1"}}])
    slow = server.create_task("slow", [{"tool": "shell", "args": {"cmd": "sleep 60"}}])
    with agent(config, "a5", "shell", extra=("--capacity", "2")) as proc:
        agent_id = connected(proc)
        server.assign(agent_id, quick, slow)
        server.wait_task(slow, {"running"}, 10, proc)
        server.wait_task(quick, {"running", "succeeded"}, 10, proc)
        seconds = proc.terminate(timeout=20)
        assert proc.popen.returncode == 0, proc.output()
        assert seconds < 10, proc.output()

    assert server.task(quick)["status"] == "succeeded"
    slow_task = server.task(slow)
    assert slow_task["status"] == "ready"  # a retryable failure goes back to the pool
    attempt = slow_task["attempts"][0]
    assert attempt["status"] == "failed" and attempt["retryable"] is True
    assert "grace period" in attempt["failure_reason"]
    _, agents = server.api("GET", "/groups/devs/agents")
    assert next(a for a in agents if a["id"] == agent_id)["status"] in ("draining", "suspect")


def test_revoking_the_device_stops_the_agent_with_a_clear_message(server, tmp_path):
    config = tmp_path / "device.json"
    device = pair(server, config, "stolen")
    with agent(config, "a6", "shell") as proc:
        connected(proc)
        status, revoked = server.api("POST", f"/devices/{device['device_id']}/revoke")
        assert status == 200 and revoked["revoked_at"], revoked
        proc.popen.wait(10)
        assert proc.popen.returncode == 3, proc.output()
        proc._reader.join(2)
        assert "stopped: this device was revoked" in proc.output(), proc.output()

    again = subprocess.run(
        [PYTHON, "-m", "claw.device", "agent", "run", "--name", "a6", "--toolkit", "shell",
         "--config", str(config)],
        env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert again.returncode == 3
    assert "refused this device's token" in again.stderr


def test_sigint_twice_is_ctrl_c_with_no_waiting(server, tmp_path):
    config = tmp_path / "device.json"
    pair(server, config, "impatient")
    slow = server.create_task("slow again", [{"tool": "shell", "args": {"cmd": "sleep 60"}}])
    with agent(config, "a7", "shell", extra=("--grace", "60")) as proc:
        agent_id = connected(proc)
        server.assign(agent_id, slow)
        server.wait_task(slow, {"running"}, 10, proc)
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGINT)
        proc.wait_for("no new work", 5)
        proc.popen.send_signal(signal.SIGINT)
        proc.popen.wait(10)
        assert time.monotonic() - started < 8 and proc.popen.returncode == 0, proc.output()
    assert server.task(slow)["attempts"][0]["retryable"] is True
