"""Fault injection for failover, on real PostgreSQL and Redis with real processes: Daphne
serving claw.asgi, `celery worker`, `celery beat` and `claw agent run` agents on separately
paired devices. Agents are killed, frozen and cut off; the Celery worker is killed inside a
claim and inside a sweep; Redis is restarted; PostgreSQL sessions are terminated; frames
are replayed; a second beat runs by mistake; an offer's frame is lost.

Every scenario ends with the same invariants (`World.check`): each task succeeded exactly
once (one `task.succeeded` event, one succeeded attempt, whose result is the task's), no
task ever had two live attempts, no agent ever held more live attempts than its capacity
(both from the attempts' timestamps and from a sampler running during the scenario), one
`task.assigned` per attempt and one `attempt.lost` per lost attempt, and the group's event
seqs are gap-free.

The module shares one stack (a dedicated database, its own `redis-server` on a free port,
Daphne, a worker, a beat, and a Django shell for writes through the services) and gives
each scenario its own group, devices and agents. Group policies keep failover fast:
heartbeat 1 s, lease 4 s, reconnect grace 2 s.

Known issues this module shows (not fixed here):

* Celery 5.7/kombu 5.7: when Redis goes away while the worker acks a message, the worker
  logs "Unrecoverable error: AttributeError('NoneType' object has no attribute
  'hostname')" and then exits, or (rarely) hangs alive consuming nothing, so compose's
  `restart: unless-stopped` alone does not always help (/healthz's worker beat goes
  stale). The Redis scenario replaces such a worker, as a supervisor with a health check
  would.
"""

import contextlib
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row
from websockets.sync.client import connect as ws_connect

from claw import protocol
from claw.device.config import DeviceConfig, save_config, ws_url
from tests.live import PYTHON, ROOT, Proc, child_env, dedicated_services, free_port, wait_listening

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.timeout(180),
]

FAST = {"heartbeat_interval_s": 1, "lease_timeout_s": 4, "reconnect_grace_s": 2, "max_attempts": 20}
TIMINGS: list[str] = []


def note(line: str) -> None:
    TIMINGS.append(line)


def until(predicate, timeout: float, what: str, *procs, interval: float = 0.1):
    """Poll until predicate() is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            outputs = "\n".join(p.output(40) for p in procs)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{outputs}")
        time.sleep(interval)


# --- the database, read directly ----------------------------------------------------------


class Db:
    """Reads (and test-side locks) on the dedicated database with psycopg; reconnects after
    its connection was terminated."""

    def __init__(self, url: str):
        self.url = url
        self.conn: psycopg.Connection | None = None

    def _connect(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=5, row_factory=dict_row
            )
        return self.conn

    def rows(self, sql: str, *params) -> list[dict]:
        for attempt in range(5):
            try:
                with self._connect().cursor() as cursor:
                    cursor.execute(sql, params)
                    return cursor.fetchall() if cursor.description else []
            except psycopg.OperationalError:
                with contextlib.suppress(Exception):
                    self.conn.close()
                self.conn = None
                if attempt == 4:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def value(self, sql: str, *params):
        rows = self.rows(sql, *params)
        return next(iter(rows[0].values())) if rows else None

    @contextlib.contextmanager
    def locked(self, sql: str, *params):
        """Hold the row locks `sql` takes (a SELECT … FOR …) in an open transaction."""
        conn = psycopg.connect(self.url, connect_timeout=5, row_factory=dict_row)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, params)
                yield cursor.fetchall()
        finally:
            with contextlib.suppress(Exception):
                conn.rollback()
            conn.close()

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


# --- a Django shell on the dedicated database, for writes through services ----------------

CONTROL = r"""
import json, sys, traceback
import django
django.setup()
from django.contrib.auth import get_user_model
from django.db import connection, transaction
import apps.events.broadcast as broadcast
from apps.devices.services import device_pair, pairing_code_create
from apps.groups.models import Group
from apps.groups.services import group_create
from apps.tasks.services import task_assign, task_create

owner, _ = get_user_model().objects.get_or_create(username="faults-owner")
replies, sys.stdout = sys.stdout, sys.stderr  # stray prints never corrupt a reply
for line in sys.stdin:
    request = json.loads(line)
    connection.close()  # a fresh connection per command: survives pg_terminate_backend
    try:
        scope = {**globals(), **request["vars"]}
        exec(request["code"], scope)
        reply = {"ok": True, "result": scope.get("result")}
    except Exception:
        reply = {"ok": False, "error": traceback.format_exc()}
    replies.write(json.dumps(reply, default=str) + "\n")
    replies.flush()
"""

GROUP_CREATE = """
result = group_create(user=owner, name=slug, slug=slug, **policies).id
"""

PAIR = """
group = Group.objects.get(id=group_id)
_, code = pairing_code_create(actor=owner, group=group)
device, token = device_pair(code=code, name=name, kind="laptop")
result = {"device_id": device.id, "token": token}
"""

# Tasks are created one transaction each (matching runs on each commit), or, when assigned
# here, created and offered in one transaction so no matcher can take them first. With
# drop_offer the attempt.offered push is swallowed: the claim commits, its frame is lost.
CREATE_TASKS = """
group = Group.objects.get(id=group_id)
real_send = broadcast.send_now
real_many = getattr(broadcast, "send_many_now", None)
if drop_offer:
    broadcast.send_now = lambda to, message: (
        None if message.get("type") == "attempt.offered" else real_send(to, message)
    )
    if real_many is not None:
        broadcast.send_many_now = lambda messages: real_many(
            [(to, m) for to, m in messages if m.get("type") != "attempt.offered"]
        )
result = []
try:
    for i in range(count):
        with transaction.atomic():
            task = task_create(group=group, actor=owner, title=f"{title} {i}", steps=steps)
            if agent_id:
                task_assign(task_id=task.id, agent_id=agent_id)
        result.append(task.id)
finally:
    broadcast.send_now = real_send
    if real_many is not None:
        broadcast.send_many_now = real_many
"""


class Control:
    """A long-lived Django process: runs snippets through the services, answers in JSON."""

    def __init__(self, env: dict[str, str], log: Path):
        self.log = log.open("w")
        self.popen = subprocess.Popen(
            [PYTHON, "-c", CONTROL],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.lock = threading.Lock()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def call(self, code: str, timeout: float = 60, **variables):
        with self.lock:
            self.popen.stdin.write(json.dumps({"code": code, "vars": variables}) + "\n")
            self.popen.stdin.flush()
            try:
                line = self.replies.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"the control shell did not answer in {timeout} s") from None
        if line is None:
            raise AssertionError(f"the control shell died:\n{Path(self.log.name).read_text()}")
        reply = json.loads(line)
        assert reply["ok"], reply["error"]
        return reply["result"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.popen.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(5)
        self.log.close()


# --- the shared stack ---------------------------------------------------------------------


class Stack:
    """Dedicated Redis, Daphne, worker and beat on the module's dedicated database."""

    def __init__(self, services: dict[str, str], tmp: Path):
        self.services, self.tmp = services, tmp
        self.redis_port = free_port()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.db = Db(services["CLAW_DATABASE_URL"])
        self.procs: list[Proc] = []
        self.redis = self.web = self.worker = self.beat = None
        self.workers = itertools.count(1)
        self.control: Control | None = None

    def env(self, app: str) -> dict[str, str]:
        return child_env(
            DJANGO_SETTINGS_MODULE="claw.settings",
            **{
                **self.services,
                "CLAW_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "CLAW_DATABASE_URL": f"{self.services['CLAW_DATABASE_URL']}?application_name={app}",
            },
        )

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, command, env)
        self.procs.append(proc)
        return proc

    def start_redis(self) -> None:
        command = [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.tmp),
        ]  # fmt: skip
        self.redis = self._start("redis", command, child_env())
        wait_listening(self.redis_port, 10, self.redis)

    def start_web(self) -> None:
        command = [
            PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(self.port),
            "--websocket-max-message-size", str(protocol.MAX_FRAME_BYTES), "claw.asgi:application",
        ]  # fmt: skip
        self.web = self._start("daphne", command, self.env("claw-web"))
        wait_listening(self.port, 30, self.web)

    def start_worker(self) -> Proc:
        n = next(self.workers)
        command = [
            PYTHON, "-m", "celery", "-A", "claw", "worker", "--loglevel", "INFO",
            "--concurrency", "2", "--hostname", f"faults{n}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self.worker = self._start(f"worker {n}", command, self.env("claw-worker"))
        self.worker.wait_for(r"\bready\.", 60)
        return self.worker

    def ensure_worker(self) -> str:
        """What a supervisor with a health check does: replace a worker that exited or is
        wedged after an unrecoverable broker error (alive, consuming nothing). Returns why
        it was replaced, or ""."""
        if self.worker.popen.poll() is not None:
            why = f"exited ({self.worker.popen.returncode})"
        elif any("Unrecoverable error" in line for line in list(self.worker.lines)):
            why = "wedged after 'Unrecoverable error'"
        else:
            return ""
        self.worker.kill()
        self.start_worker()
        return why

    def start_beat(self, name: str = "beat") -> Proc:
        command = [
            PYTHON, "-m", "celery", "-A", "claw", "beat", "--loglevel", "INFO",
            "--schedule", str(self.tmp / f"{name}-schedule"),
        ]  # fmt: skip
        beat = self._start(name, command, self.env("claw-beat"))
        beat.wait_for(r"Sending due task", 60)
        return beat

    def worker_backends(self, *, blocked_on: str = "") -> list[dict]:
        """The worker's database sessions waiting on a row lock (query ILIKE blocked_on)."""
        return self.db.rows(
            "SELECT pid, query, wait_event_type FROM pg_stat_activity "
            "WHERE application_name = 'claw-worker' AND wait_event_type = 'Lock' "
            "AND query ILIKE %s",
            f"%{blocked_on}%",
        )

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.close()
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        for n, proc in enumerate(self.procs):
            name = re.sub(r"\W+", "-", proc.name)
            (logs / f"{n:02d}-{name}.log").write_text("\n".join(proc.lines))
        if self.control is not None:
            self.control.close()
        self.db.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    started = time.monotonic()
    with dedicated_services("faults", tmp) as services:
        stack = Stack(services, tmp)
        try:
            stack.start_redis()
            stack.control = Control(stack.env("claw-control"), tmp / "control.log")
            stack.start_web()
            stack.start_worker()
            stack.beat = stack.start_beat()
            stack.control.call("result = 1")
            note(f"stack up in {time.monotonic() - started:.1f} s")
            yield stack
        finally:
            stack.close()


@pytest.fixture(scope="module", autouse=True)
def timings(request):
    started = time.monotonic()
    yield
    TIMINGS.append(f"module: {time.monotonic() - started:.1f} s")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_sep("-", "fault-injection timings")
            for line in TIMINGS:
                reporter.write_line(line)


# --- agents -------------------------------------------------------------------------------


class AgentProc:
    """A `claw agent run` process."""

    def __init__(self, proc: Proc, name: str, device: dict):
        self.proc, self.name, self.device = proc, name, device
        self.agent_id: int | None = None
        self.started = time.monotonic()
        self.startup_s: float | None = None

    def connections(self) -> int:
        return sum(" as agent " in line for line in list(self.proc.lines))

    def connected(self, times: int = 1, timeout: float = 30) -> int:
        until(lambda: self.connections() >= times, timeout, f"{self.name} connected", self.proc)
        if self.startup_s is None:
            self.startup_s = time.monotonic() - self.started
        line = [line for line in list(self.proc.lines) if " as agent " in line][-1]
        self.agent_id = int(re.search(r" as agent (\d+) ", line).group(1))
        return self.agent_id

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.popen.pid, signum)

    def kill(self) -> None:
        self.proc.kill()

    def output(self, last: int = 60) -> str:
        return self.proc.output(last)


class RawAgent:
    """A hand-driven agent socket built on claw.protocol's frames: it answers nothing by
    itself, only heartbeats while the test waits."""

    def __init__(self, base: str, device: dict, name: str, capacity: int = 1):
        self.url, self.device, self.name, self.capacity = ws_url(base), device, name, capacity
        self.counter = itertools.count(1)
        self.inbox: list[dict] = []
        self.beats: set[str] = set()
        self.ws = None
        self.welcome: dict | None = None
        self.interval, self.last_beat = 1.0, 0.0

    def next_id(self) -> str:
        return f"{self.name}-{next(self.counter)}"

    def connect(self) -> dict:
        self.ws = ws_connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.device['token']}"},
            open_timeout=10,
            close_timeout=2,
            proxy=None,
            legacy=True,
        )
        self.inbox.clear()
        hello = protocol.Hello(
            type="hello",
            id=self.next_id(),
            versions=list(protocol.SUPPORTED_VERSIONS),
            agent=protocol.AgentInfo(
                name=self.name, toolkits={"shell": "1"}, capacity=self.capacity
            ),
        )
        self.ws.send(hello.model_dump_json())
        welcome = self.expect(lambda f: f["type"] == "welcome")
        self.welcome = protocol.Welcome.model_validate(welcome).model_dump(mode="json")
        self.interval, self.last_beat = welcome["heartbeat_interval_s"], time.monotonic()
        return self.welcome

    def _beat(self) -> None:
        if time.monotonic() - self.last_beat >= self.interval:
            frame_id = self.next_id()
            self.beats.add(frame_id)
            self.ws.send(protocol.Heartbeat(type="heartbeat", id=frame_id).model_dump_json())
            self.last_beat = time.monotonic()

    def _receive(self, timeout: float) -> None:
        try:
            text = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return
        frame = json.loads(text)
        if frame.get("re") in self.beats:
            return
        protocol.SERVER_FRAMES.validate_python(frame)
        self.inbox.append(frame)

    def expect(self, predicate, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for index, frame in enumerate(self.inbox):
                if predicate(frame):
                    return self.inbox.pop(index)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no such frame; inbox: {self.inbox[-5:]}")
            self._beat()
            self._receive(0.1)

    def pump(self, seconds: float) -> None:
        """Heartbeat and collect frames for a while."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._beat()
            self._receive(min(0.1, left))

    def send(self, model: type[protocol.Frame], frame_id: str | None = None, **fields) -> str:
        frame_id = frame_id or self.next_id()
        text = model(type=_type_of(model), id=frame_id, **fields).model_dump_json()
        self.ws.send(text)
        return frame_id

    def answer(self, frame_id: str, timeout: float = 15) -> dict:
        return self.expect(
            lambda f: f.get("re") == frame_id and f["type"] in ("ack", "error"), timeout
        )

    def call(self, model: type[protocol.Frame], frame_id: str | None = None, **fields) -> dict:
        return self.answer(self.send(model, frame_id, **fields))

    def close(self) -> None:
        """A clean close (close frame, code 1000)."""
        if self.ws is not None:
            self.ws.close()


def _type_of(model: type[protocol.Frame]) -> str:
    return model.model_fields["type"].annotation.__args__[0]


# --- one scenario's group, devices and agents ---------------------------------------------


class Monitor(threading.Thread):
    """Samples the group's live attempts (one consistent snapshot per query) while the
    scenario runs: never two per task, never more than an agent's capacity."""

    def __init__(self, url: str, group_id: int):
        super().__init__(daemon=True)
        self.db, self.group_id = Db(url), group_id
        self.stopped = threading.Event()
        self.samples = 0
        self.violations: list[str] = []

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            with contextlib.suppress(psycopg.Error):
                self.sample()

    def sample(self) -> None:
        rows = self.db.rows(
            "SELECT a.id, a.task_id, a.agent_id, ag.capacity FROM tasks_attempt a "
            "JOIN tasks_task t ON t.id = a.task_id JOIN devices_agent ag ON ag.id = a.agent_id "
            "WHERE t.group_id = %s AND a.status IN ('offered', 'running')",
            self.group_id,
        )
        self.samples += 1
        per_task = Counter(row["task_id"] for row in rows)
        per_agent = Counter(row["agent_id"] for row in rows)
        capacity = {row["agent_id"]: row["capacity"] for row in rows}
        self.violations += [f"task {t}: {n} live attempts" for t, n in per_task.items() if n > 1]
        self.violations += [
            f"agent {a}: {n} live attempts, capacity {capacity[a]}"
            for a, n in per_agent.items()
            if n > capacity[a]
        ]

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.db.close()


class World:
    """One scenario's group (fast failover policies), its devices and agents."""

    slugs = itertools.count(1)

    def __init__(self, stack: Stack, tmp: Path, **policies):
        self.stack, self.tmp, self.db = stack, tmp, stack.db
        if why := stack.ensure_worker():  # an earlier scenario's outage must not leak here
            note(f"  (worker replaced before a scenario: {why})")
        self.slug = f"faults-{next(self.slugs)}"
        self.group_id = stack.control.call(
            GROUP_CREATE, slug=self.slug, policies={**FAST, **policies}
        )
        self.policies = {**FAST, **policies}
        self.agents: list[AgentProc] = []
        self.raws: list[RawAgent] = []
        self.monitor = Monitor(stack.db.url, self.group_id)
        self.monitor.start()

    # setup

    def device(self, name: str) -> dict:
        device = self.stack.control.call(PAIR, group_id=self.group_id, name=name)
        config = self.tmp / name / "device.json"
        save_config(
            DeviceConfig(
                server=self.stack.base,
                device_id=device["device_id"],
                token=device["token"],
                name=name,
                kind="laptop",
                group_id=self.group_id,
            ),
            config,
        )
        return {**device, "name": name, "config": config}

    def start_agent(self, device: dict, name: str, capacity: int = 1) -> AgentProc:
        command = [
            PYTHON, "-m", "claw.device", "agent", "run", "--name", name,
            "--config", str(device["config"]), "--toolkit", "shell",
            "--capacity", str(capacity), "--grace", "1",
        ]  # fmt: skip
        agent = AgentProc(Proc(f"agent {name}", command, child_env()), name, device)
        self.agents.append(agent)
        return agent

    def agent(self, device: dict, name: str, capacity: int = 1) -> AgentProc:
        agent = self.start_agent(device, name, capacity)
        agent.connected()
        return agent

    def fleet(self, *names: str, capacity: int = 1) -> list[AgentProc]:
        """One agent per name, each on its own newly paired device, started together."""
        agents = [self.start_agent(self.device(f"{n}-device"), n, capacity) for n in names]
        for agent in agents:
            agent.connected()
        return agents

    def raw(self, device: dict, name: str, capacity: int = 1) -> RawAgent:
        raw = RawAgent(self.stack.base, device, name, capacity)
        self.raws.append(raw)
        raw.connect()
        return raw

    def create(self, count: int, steps: list, title: str = "job", **options) -> list[int]:
        return self.stack.control.call(
            CREATE_TASKS,
            group_id=self.group_id,
            count=count,
            steps=steps,
            title=title,
            agent_id=options.get("assign_to"),
            drop_offer=options.get("drop_offer", False),
        )

    # reads

    def tasks(self, task_ids: list[int]) -> dict[int, dict]:
        rows = self.db.rows(
            "SELECT id, status, epoch, result FROM tasks_task WHERE id = ANY(%s)", list(task_ids)
        )
        return {row["id"]: row for row in rows}

    def count(self, task_ids: list[int], status: str = "succeeded") -> int:
        return self.db.value(
            "SELECT count(*) FROM tasks_task WHERE id = ANY(%s) AND status = %s",
            list(task_ids),
            status,
        )

    def attempts(self, task_id: int) -> list[dict]:
        return self.db.rows(
            "SELECT id, task_id, agent_id, device_id, epoch, status, failure_reason, result, "
            "offered_at, started_at, ended_at FROM tasks_attempt WHERE task_id = %s "
            "ORDER BY epoch",
            task_id,
        )

    def events(self, kind: str | None = None, task_id: int | None = None) -> list[dict]:
        return [
            e
            for e in self.db.rows(
                "SELECT seq, kind, task_id, attempt_id, agent_id, payload, created_at "
                "FROM events_event WHERE group_id = %s ORDER BY seq",
                self.group_id,
            )
            if (kind is None or e["kind"] == kind) and (task_id is None or e["task_id"] == task_id)
        ]

    def agent_status(self, agent_id: int) -> str:
        return self.db.value("SELECT status FROM devices_agent WHERE id = %s", agent_id)

    def wait_done(self, task_ids: list[int], timeout: float, *procs) -> float:
        """Wait until every task succeeded; returns the seconds it took."""
        started = time.monotonic()
        everyone = [*procs, *(a.proc for a in self.agents), self.stack.worker, self.stack.web]
        until(
            lambda: self.count(task_ids) == len(task_ids),
            timeout,
            f"{len(task_ids)} tasks to succeed (at {self.count(task_ids)}; "
            f"{Counter(t['status'] for t in self.tasks(task_ids).values())})",
            *everyone,
            interval=0.2,
        )
        return time.monotonic() - started

    def wait_event(self, kind: str, task_id: int | None, timeout: float, *procs) -> dict:
        found = until(
            lambda: self.events(kind, task_id), timeout, f"a {kind} event (task {task_id})", *procs
        )
        return found[0]

    # the invariants

    def check(self, task_ids: list[int]) -> dict:
        """Assert every invariant for these tasks and the group; returns some counts."""
        self.monitor.sample()
        tasks = self.tasks(task_ids)
        statuses = Counter(t["status"] for t in tasks.values())
        assert statuses == {"succeeded": len(task_ids)}, f"lost or unfinished tasks: {statuses}"

        events = self.events()
        seqs = [e["seq"] for e in events]
        last = self.db.value("SELECT event_seq FROM groups_group WHERE id = %s", self.group_id)
        assert seqs == list(range(1, last + 1)), "event seqs have gaps or duplicates"
        succeeded = Counter(e["task_id"] for e in events if e["kind"] == "task.succeeded")
        doubles = {t: succeeded[t] for t in task_ids if succeeded[t] != 1}
        assert not doubles, f"task.succeeded events per task (must be 1): {doubles}"

        attempts = self.db.rows(
            "SELECT a.id, a.task_id, a.agent_id, ag.capacity, a.epoch, a.status, a.result, "
            "a.offered_at, a.ended_at FROM tasks_attempt a "
            "JOIN tasks_task t ON t.id = a.task_id JOIN devices_agent ag ON ag.id = a.agent_id "
            "WHERE t.group_id = %s ORDER BY a.task_id, a.epoch",
            self.group_id,
        )
        by_task = defaultdict(list)
        for attempt in attempts:
            assert attempt["ended_at"] is not None, f"attempt still live: {attempt}"
            by_task[attempt["task_id"]].append(attempt)
        for task_id in task_ids:
            mine = by_task[task_id]
            wins = [a for a in mine if a["status"] == "succeeded"]
            assert len(wins) == 1, f"task {task_id}: {len(wins)} succeeded attempts"
            assert wins[0]["result"] == tasks[task_id]["result"], f"task {task_id}: result"
            for earlier, later in itertools.pairwise(mine):
                assert earlier["epoch"] < later["epoch"]
                assert earlier["ended_at"] <= later["offered_at"], (
                    f"task {task_id}: two live attempts at once: {earlier} / {later}"
                )
        by_agent = defaultdict(list)
        for attempt in attempts:
            by_agent[attempt["agent_id"]].append(attempt)
        for agent_id, mine in by_agent.items():
            edges = sorted(
                [(a["offered_at"], 1) for a in mine] + [(a["ended_at"], -1) for a in mine],
                key=lambda edge: (edge[0], edge[1]),
            )
            peak = max(itertools.accumulate(delta for _, delta in edges))
            assert peak <= mine[0]["capacity"], f"agent {agent_id}: {peak} live at once"

        assigned = Counter(e["attempt_id"] for e in events if e["kind"] == "task.assigned")
        lost = Counter(e["attempt_id"] for e in events if e["kind"] == "attempt.lost")
        for attempt in attempts:
            assert assigned[attempt["id"]] == 1, f"attempt {attempt['id']} assigned twice"
            expected = 1 if attempt["status"] == "lost" else 0
            assert lost[attempt["id"]] == expected, f"attempt {attempt['id']}: lost events"
        assert not self.monitor.violations, self.monitor.violations[:10]
        assert self.monitor.samples > 0
        return {
            "attempts": len(attempts),
            "lost": sum(a["status"] == "lost" for a in attempts),
            "events": len(events),
            "samples": self.monitor.samples,
        }

    def close(self) -> None:
        self.monitor.stop()
        for raw in self.raws:
            with contextlib.suppress(Exception):
                raw.ws.close()
        for agent in self.agents:
            agent.signal(signal.SIGCONT)
            agent.kill()


@pytest.fixture
def world(stack, tmp_path):
    worlds: list[World] = []

    def make(**policies) -> World:
        worlds.append(World(stack, tmp_path, **policies))
        return worlds[-1]

    try:
        yield make
    finally:
        for made in worlds:
            made.close()


def sleep_step(seconds: float) -> dict:
    return {"tool": "shell", "args": {"cmd": f"sleep {seconds}"}}


PWD = {"tool": "shell", "args": {"cmd": "pwd"}}


def holder_of(agents: list[AgentProc], attempt: dict) -> AgentProc:
    return next(a for a in agents if a.agent_id == attempt["agent_id"])


def live_of(w: World, agent_id: int) -> set[int]:
    return {
        row["id"]
        for row in w.db.rows(
            "SELECT id FROM tasks_attempt WHERE agent_id = %s AND status IN ('offered', 'running')",
            agent_id,
        )
    }


def live_attempt(w: World, task_id: int, status: str = "running", timeout: float = 15) -> dict:
    return until(
        lambda: [a for a in w.attempts(task_id) if a["status"] == status],
        timeout,
        f"a {status} attempt of task {task_id}",
        *(a.proc for a in w.agents),
    )[-1]


def timeline(w: World, task_id: int) -> list[tuple]:
    kinds = {"task.assigned", "task.running", "attempt.lost", "task.succeeded"}
    devices = {
        row["id"]: row["device_id"]
        for row in w.db.rows(
            "SELECT id, device_id FROM devices_agent WHERE group_id = %s", w.group_id
        )
    }
    return [
        (e["kind"], devices.get(e["agent_id"]))
        for e in w.events(task_id=task_id)
        if e["kind"] in kinds
    ]


# --- 1. kill -9 an agent mid-task ---------------------------------------------------------


def test_an_agent_killed_mid_task_loses_it_to_an_agent_on_another_device(world):
    w = world()
    agents = w.fleet("s1-a", "s1-b")
    [task] = w.create(1, [sleep_step(5), PWD], title="killed mid-task")
    first = live_attempt(w, task)
    holder = holder_of(agents, first)
    other = next(a for a in agents if a is not holder)
    holder.proc.wait_for(r"step 0: shell", 10)

    killed = time.monotonic()
    holder.kill()  # SIGKILL to the agent and its `sleep`
    w.wait_event("attempt.lost", task, 15, holder.proc)
    lost_after = time.monotonic() - killed
    w.wait_done([task], 30)
    done_after = time.monotonic() - killed

    attempts = w.attempts(task)
    assert [(a["status"], a["device_id"]) for a in attempts] == [
        ("lost", holder.device["device_id"]),
        ("succeeded", other.device["device_id"]),
    ]
    assert attempts[0]["failure_reason"] == "agent disconnected"
    assert timeline(w, task) == [
        ("task.assigned", holder.device["device_id"]),
        ("task.running", holder.device["device_id"]),
        ("attempt.lost", holder.device["device_id"]),
        ("task.assigned", other.device["device_id"]),
        ("task.running", other.device["device_id"]),
        ("task.succeeded", other.device["device_id"]),
    ]
    assert w.tasks([task])[task]["result"]["steps"][1]["output"]["stdout"].startswith(
        str(other.device["config"].parent)
    )
    counts = w.check([task])
    # grace 2 s + a sweep (every 1 s); then backoff 1 s + a match_all (every 2 s) + 5 s of work
    assert 2 <= lost_after <= 2 + 2.5, lost_after
    note(f"1 agent kill -9: lost after {lost_after:.1f} s, done after {done_after:.1f} s; {counts}")


# --- 2. SIGSTOP an agent past its lease, then SIGCONT --------------------------------------


def test_a_frozen_agent_past_its_lease_is_fenced_when_it_wakes_up(world):
    w = world()
    agents = w.fleet("s2-a", "s2-b")
    [task] = w.create(1, [sleep_step(3), PWD], title="frozen holder")
    first = live_attempt(w, task)
    holder = holder_of(agents, first)
    other = next(a for a in agents if a is not holder)
    holder.proc.wait_for(r"step 0: shell", 10)

    stopped = time.monotonic()
    holder.signal(signal.SIGSTOP)  # the agent and its `sleep`: no heartbeats, socket open
    w.wait_event("attempt.lost", task, 15, holder.proc)
    lost_after = time.monotonic() - stopped
    w.wait_done([task], 30)
    done_after = time.monotonic() - stopped
    finished = w.tasks([task])[task]

    holder.signal(signal.SIGCONT)
    stale = w.wait_event("attempt.stale_write", task, 15, holder.proc)
    holder.proc.wait_for(r"no longer ours", 10)
    assert (stale["attempt_id"], stale["agent_id"]) == (first["id"], holder.agent_id)
    assert stale["payload"]["epoch"] == first["epoch"]
    assert w.tasks([task])[task] == finished  # the late writer changed nothing

    attempts = w.attempts(task)
    assert [(a["status"], a["agent_id"]) for a in attempts] == [
        ("lost", holder.agent_id),
        ("succeeded", other.agent_id),
    ]
    assert attempts[0]["failure_reason"] == "lease expired" and attempts[0]["result"] is None
    assert finished["result"]["steps"][1]["output"]["stdout"].startswith(
        str(other.device["config"].parent)
    )
    # The woken agent heartbeats on its still-open socket: it is back and takes new work.
    until(lambda: w.agent_status(holder.agent_id) == "online", 5, "the woken agent online")
    other.kill()
    [after] = w.create(1, [PWD], title="for the woken agent")
    w.wait_done([after], 15, holder.proc)
    assert [a["agent_id"] for a in w.attempts(after)] == [holder.agent_id]
    counts = w.check([task, after])
    # lease 4 s from the last heartbeat (at most ~1 s before the stop) + a sweep
    assert lost_after <= 4 + 2, lost_after
    note(
        f"2 SIGSTOP past lease: lost after {lost_after:.1f} s, done elsewhere after "
        f"{done_after:.1f} s, stale write fenced ({stale['payload']['frame']}); {counts}"
    )


# --- 3. a socket closed cleanly: reassigned after the grace, kept by a reconnect within it --


def is_offer(task_id: int):
    return lambda frame: frame["type"] == "assignment" and frame["task"]["id"] == task_id


def test_a_cleanly_closed_socket_keeps_its_attempt_only_within_the_grace(world):
    w = world()
    grace = w.policies["reconnect_grace_s"]
    raw = w.raw(w.device("s3-raw-device"), "s3-raw")

    # Reconnecting inside the grace keeps the attempt: welcome.owned lists it.
    [kept] = w.create(1, [PWD], title="kept across a reconnect")
    offer = raw.expect(is_offer(kept))
    ids = {"attempt_id": offer["attempt_id"], "epoch": offer["epoch"]}
    assert raw.call(protocol.Accept, **ids)["result"]["status"] == "running"
    closed = time.monotonic()
    raw.close()
    time.sleep(0.5)
    welcome = raw.connect()
    assert [(a["attempt_id"], a["epoch"], a["status"]) for a in welcome["owned"]] == [
        (ids["attempt_id"], ids["epoch"], "running")
    ]
    raw.pump(grace + 2 - (time.monotonic() - closed))  # past the grace and a sweep
    assert w.events("attempt.lost", kept) == []
    assert w.agent_status(welcome["agent_id"]) == "busy"
    done = raw.call(protocol.Complete, **ids, result={"by": "raw"})
    assert done["result"] == {"status": "succeeded"}, done

    # Not coming back: the attempt is lost after the grace and runs on another device.
    [moved] = w.create(1, [PWD], title="moved after a clean close")
    offer = raw.expect(is_offer(moved))
    ids = {"attempt_id": offer["attempt_id"], "epoch": offer["epoch"]}
    assert raw.call(protocol.Accept, **ids)["result"]["status"] == "running"
    other = w.agent(w.device("s3-b-device"), "s3-b")
    closed_at = time.time()
    raw.close()
    lost = w.wait_event("attempt.lost", moved, grace + 10, other.proc)
    lost_after = lost["created_at"].timestamp() - closed_at
    w.wait_done([moved], 20)
    reassigned = w.events("task.assigned", moved)[-1]
    reassigned_after = reassigned["created_at"].timestamp() - closed_at

    attempts = w.attempts(moved)
    assert [(a["status"], a["agent_id"]) for a in attempts] == [
        ("lost", welcome["agent_id"]),
        ("succeeded", other.agent_id),
    ]
    assert attempts[0]["failure_reason"] == "agent disconnected"
    assert w.events("agent.offline")[-1]["agent_id"] == welcome["agent_id"]
    counts = w.check([kept, moved])
    assert grace <= lost_after <= grace + 2, lost_after
    note(
        f"3 clean close: kept over a {grace} s grace by a reconnect after 0.5 s; without one, "
        f"lost after {lost_after:.2f} s and reassigned after {reassigned_after:.2f} s; {counts}"
    )


# --- 4. kill -9 the Celery worker inside a matching and a sweeping transaction --------------

# Every claim and every sweep appends its events last, in its own transaction (the group
# row's event_seq bump, then commit). A test transaction holding that row makes the worker
# wait there with all its other writes done, uncommitted; it is killed right then.
WAITING_FOR_SEQ = "groups_group"
DRAIN = """
from apps.devices.models import Device
from apps.devices.services import device_set_draining
for device in Device.objects.filter(id__in=device_ids):
    device_set_draining(actor=owner, device=device, draining=draining)
"""


def kill_worker_inside_transaction(stack: Stack, w: World, then=None, holding=None) -> str:
    """Lock the group's row (running `then` under the lock) until the worker waits for it
    inside a transaction (and, given `holding`, has those attempts' rows locked too), kill
    -9 the worker, release. Returns the query it was killed in."""
    with w.db.locked("SELECT id FROM groups_group WHERE id = %s FOR NO KEY UPDATE", w.group_id):
        if then is not None:
            then()

        def killable():
            waiting = stack.worker_backends(blocked_on=WAITING_FOR_SEQ)
            if waiting and holding and not attempts_locked(w, holding):
                return []
            return waiting

        waiting = until(killable, 30, "the worker to wait inside a transaction", stack.worker)
        stack.worker.kill()
        waiting = stack.worker_backends() or waiting
    # Its sessions see the dead client once the row is free, and roll back.
    until(
        lambda: (
            not stack.db.rows(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'claw-worker'"
            )
        ),
        15,
        "the killed worker's sessions to end",
    )
    return " | ".join(b["query"].split(" FROM ")[0][:40] for b in waiting)


def attempts_locked(w: World, attempt_ids: set[int]) -> bool:
    """Whether another transaction holds (has written) one of these attempts' rows."""
    try:
        with w.db.locked(
            "SELECT id FROM tasks_attempt WHERE id = ANY(%s) FOR SHARE NOWAIT",
            list(attempt_ids),
        ):
            return False
    except psycopg.errors.LockNotAvailable:
        return True


def offered_to(w: World, agent_id: int) -> list[dict]:
    return w.db.rows(
        "SELECT id, lease_expires_at FROM tasks_attempt WHERE agent_id = %s "
        "AND status = 'offered' ORDER BY lease_expires_at",
        agent_id,
    )


def test_killing_the_worker_inside_matching_and_sweeping_changes_nothing_twice(world, stack):
    w = world()
    a, b = w.fleet("s4-a", "s4-b", capacity=4)
    started = time.monotonic()

    # Matching: 200 ready tasks wait for draining devices; the devices come back while the
    # group's row is held, the matcher claims a batch and waits to number its events.
    device_ids = [a.device["device_id"], b.device["device_id"]]
    stack.control.call(DRAIN, device_ids=device_ids, draining=True)
    tasks = w.create(200, [sleep_step(0.2)], title="burst")
    created = time.monotonic() - started
    undrain = lambda: w.db.rows(  # noqa: E731 - no event: the group's row is held
        "UPDATE devices_device SET draining = false WHERE id = ANY(%s)", device_ids
    )
    matcher_query = kill_worker_inside_transaction(stack, w, then=undrain)
    killed_matching_at = time.monotonic() - started
    # The killed claim rolled back whole: nothing was offered.
    assert w.count(tasks, "ready") == 200
    assert (
        w.db.value(
            "SELECT count(*) FROM tasks_attempt WHERE agent_id = ANY(%s)", [a.agent_id, b.agent_id]
        )
        == 0
    )
    assert w.events("task.assigned") == []
    stack.start_worker()

    # Sweeping: an agent that ignores its offers; the worker is killed while it declares
    # them lapsed, inside attempt_lose. (The other devices drain meanwhile, so no matcher
    # takes the worker's processes first.)
    until(lambda: w.count(tasks) >= 30, 60, "30 tasks done", stack.worker)
    raw = w.raw(w.device("s4-raw-device"), "s4-raw", capacity=3)
    offers = until(
        lambda: len(offered_to(w, raw.welcome["agent_id"])) == 3, 15, "offers to the raw agent"
    )
    stack.control.call(DRAIN, device_ids=device_ids, draining=True)
    offers = offered_to(w, raw.welcome["agent_id"])
    held = {o["id"] for o in offers}
    lapse = min(o["lease_expires_at"] for o in offers).timestamp()
    raw.pump(max(0.0, lapse - time.time() - 0.3))
    sweeper_query = kill_worker_inside_transaction(stack, w, holding=held)
    killed_sweeping_at = time.monotonic() - started
    assert {o["id"] for o in offered_to(w, raw.welcome["agent_id"])} >= held
    assert not [e for e in w.events("attempt.lost") if e["attempt_id"] in held]
    raw.close()
    stack.control.call(DRAIN, device_ids=device_ids, draining=False)
    stack.start_worker()

    w.wait_done(tasks, 120)
    total = time.monotonic() - started
    counts = w.check(tasks)
    lost = [e for e in w.events("attempt.lost") if e["attempt_id"] in held]
    assert sorted(e["attempt_id"] for e in lost) == sorted(held)  # once each
    note(
        f"4 worker kill -9: 200 tasks created in {created:.1f} s; killed inside a claim at "
        f"{killed_matching_at:.1f} s ({matcher_query!r}), inside attempt_lose at "
        f"{killed_sweeping_at:.1f} s ({len(held)} lapsed offers in hand, {sweeper_query!r}); "
        f"all done after "
        f"{total:.1f} s; {counts}"
    )


# --- 5. restart the (dedicated) Redis: broker queues and channel groups are gone -----------


def settled(agent: AgentProc, since: int) -> bool:
    """No reconnect in progress: the agent's last connection event since `since` (if any)
    is a welcome, not a lost or failed connection."""
    events = [
        line
        for line in agent.proc.lines[since:]
        if " as agent " in line or "reconnecting in" in line
    ]
    return not events or " as agent " in events[-1]


def welcomed_at(agent: AgentProc) -> float:
    """When the agent last logged its welcome (its log lines start with asctime)."""
    line = [line for line in agent.proc.lines if " as agent " in line][-1]
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_after_a_redis_restart_sockets_groups_and_assignments_recover(world, stack):
    w = world()
    agents = w.fleet("s5-a", "s5-b", capacity=2)
    before = w.create(12, [sleep_step(0.5)], title="before the restart")
    until(lambda: w.count(before) >= 3, 30, "3 tasks done", *(a.proc for a in agents))

    stopped = time.monotonic()
    since = {a.name: len(a.proc.lines) for a in agents}
    stack.redis.terminate()  # no persistence: queued messages and channel groups are lost
    time.sleep(1.5)
    stack.start_redis()
    restarted = time.monotonic()
    restarted_at = time.time()
    # A supervisor's job: replace what died of the outage (or hangs after it). The worker
    # either takes tasks again or has logged its unrecoverable error by then.
    seen = len(stack.worker.lines)
    until(
        lambda: (
            stack.worker.popen.poll() is not None
            or any(
                " received" in line or "Unrecoverable error" in line
                for line in stack.worker.lines[seen:]
            )
        ),
        20,
        "the worker to take tasks again (or fail)",
        stack.worker,
    )
    died = [f"worker {why}" for why in [stack.ensure_worker()] if why]
    if stack.beat.popen.poll() is not None:
        died.append("beat")
        stack.beat = stack.start_beat()
    after = w.create(12, [sleep_step(0.5)], title="after the restart")
    first_offer = w.wait_event("task.assigned", after[0], 30, stack.worker, stack.web)
    w.wait_done(before + after, 60, stack.worker, stack.web, stack.beat)
    done_after = time.monotonic() - restarted

    # Then each agent is offered a task of its own: it gets it only if its socket is in its
    # channel group again.
    probes = {}
    for agent in agents:
        until(
            lambda agent=agent: (
                settled(agent, since[agent.name])
                and w.agent_status(agent.agent_id) in ("online", "busy")
            ),
            30,
            f"{agent.name} connected again",
            agent.proc,
        )
        [probes[agent.name]] = w.create(
            1, [PWD], title=f"probe {agent.name}", assign_to=agent.agent_id
        )
    w.wait_done(list(probes.values()), 30)
    delivered = {name: w.attempts(probe)[0]["status"] for name, probe in probes.items()}

    counts = w.check(before + after + list(probes.values()))
    reconnects = {a.name: a.connections() - 1 for a in agents}
    back_after = {a.name: round(welcomed_at(a) - restarted_at, 1) for a in agents}
    lapsed = [
        e
        for e in w.events("attempt.lost")
        if e["payload"]["reason"] == "offer not accepted in time"
    ]
    note(
        f"5 redis restart (down {restarted - stopped:.1f} s): died {died or 'nothing'}; agent "
        f"reconnects {reconnects}, welcomed again {back_after} s after the restart; first "
        f"new offer after "
        f"{first_offer['created_at'].timestamp() - restarted_at:.1f} s, all done after "
        f"{done_after:.1f} s; {len(lapsed)} offers lapsed; own offer afterwards {delivered}; "
        f"{counts}"
    )
    # Every agent's socket outlived the restart (apps.events.layer), re-joined its channel
    # groups and got its own offer.
    assert reconnects == {a.name: 0 for a in agents}, reconnects
    assert set(delivered.values()) == {"succeeded"}, delivered


# --- 5b. Redis down for 10 s: the channel layer is a best-effort pipe ----------------------

OUTAGE_S = 10
CONNECTION = "SELECT connection FROM devices_agent WHERE id = %s"


def replace_what_died(stack: Stack, seen: int) -> list[str]:
    """After Redis is back: wait until the worker takes tasks again (or has logged its
    unrecoverable error), then replace whatever died of the outage, as a supervisor would."""
    until(
        lambda: (
            stack.worker.popen.poll() is not None
            or any(
                " received" in line or "Unrecoverable error" in line
                for line in stack.worker.lines[seen:]
            )
        ),
        30,
        "the worker to take tasks again (or fail)",
        stack.worker,
    )
    died = [f"worker {why}" for why in [stack.ensure_worker()] if why]
    if stack.beat.popen.poll() is not None:
        died.append("beat")
        stack.beat = stack.start_beat()
    return died


def test_a_redis_outage_closes_no_agent_socket_and_reruns_no_attempt(world, stack):
    w = world(lease_timeout_s=6)
    agents = w.fleet("s10-a", "s10-b", capacity=3)
    connections = {a.name: w.db.value(CONNECTION, a.agent_id) for a in agents}
    # Four attempts run through the outage, a progress frame per step: two end inside it,
    # two after it.
    inside = w.create(2, [sleep_step(1.5)] * 5, title="ends inside the outage")
    across = w.create(2, [sleep_step(1.5)] * 10, title="ends after the outage")
    until(
        lambda: len({e["task_id"] for e in w.events("progress.step")}) == 4,
        30,
        "the four tasks to report progress",
        *(a.proc for a in agents),
    )

    newcomer_device = w.device("s10-newcomer-device")  # pairing reads the cache: before
    seen = len(stack.worker.lines)
    stack.redis.terminate()  # no persistence: queued messages and channel groups are lost
    stopped_at = time.time()
    # A newcomer is welcomed while Redis is down, then leaves.
    joined = time.monotonic()
    try:
        w.raw(newcomer_device, "s10-newcomer").close()
        welcomed_in = time.monotonic() - joined
    except Exception as exc:  # noted below with the rest
        welcomed_in = float("inf")
        note(f"  (5b: the newcomer was not welcomed: {exc!r})")
    # Offers made late in the outage: their pushes are lost with Redis, yet each agent
    # must get its own once Redis is back, before the offer's deadline.
    time.sleep(max(0.0, stopped_at + OUTAGE_S - 1.5 - time.time()))
    late = [
        w.create(1, [PWD], title=f"offered in the outage to {a.name}", assign_to=a.agent_id)[0]
        for a in agents
    ]
    beats = {
        a.name: w.db.value("SELECT last_heartbeat_at FROM devices_agent WHERE id = %s", a.agent_id)
        for a in agents
    }
    time.sleep(max(0.0, stopped_at + OUTAGE_S - time.time()))
    stack.start_redis()
    restarted_at = time.time()
    died = replace_what_died(stack, seen)

    # Pushes resume: new work is offered through the matcher, and each agent gets an offer
    # on its own channel group (re-joined after the outage).
    after = w.create(6, [sleep_step(0.3)], title="after the outage")
    w.wait_done(inside + across + late + after, 60, stack.worker, stack.web, stack.beat)
    probes = [w.create(1, [PWD], title=f"probe {a.name}", assign_to=a.agent_id)[0] for a in agents]
    w.wait_done(probes, 30, stack.worker, stack.web)
    done_after = time.time() - restarted_at

    tasks = inside + across + late + after + probes
    rerun = {t: [a["status"] for a in w.attempts(t)] for t in tasks}
    rerun = {t: statuses for t, statuses in rerun.items() if statuses != ["succeeded"]}
    mine = {a.agent_id for a in agents}
    dropped = [
        (e["kind"], e["agent_id"], e["created_at"])
        for e in w.events()
        if e["agent_id"] in mine and e["kind"] in ("agent.disconnected", "agent.offline")
    ]
    reconnects = {a.name: a.connections() - 1 for a in agents}
    during = [e for e in w.events() if stopped_at < e["created_at"].timestamp() < restarted_at]
    committed = Counter(e["kind"] for e in during)
    note(
        f"5b redis down {restarted_at - stopped_at:.1f} s: died {died or 'nothing'}; agent "
        f"reconnects {reconnects}; newcomer welcomed in {welcomed_in:.1f} s; committed during "
        f"the outage {dict(committed)}; re-run {rerun or 'none'}; all done "
        f"{done_after:.1f} s after the restart"
    )
    assert reconnects == {a.name: 0 for a in agents}, "\n".join(a.output() for a in agents)
    assert not dropped, dropped
    assert {a.name: w.db.value(CONNECTION, a.agent_id) for a in agents} == connections
    assert not rerun, rerun
    assert committed["progress.step"] >= 8 and committed["task.succeeded"] >= 2, committed
    assert all(beat.timestamp() > restarted_at - 3 for beat in beats.values()), beats
    assert welcomed_in < 5, welcomed_in
    w.check(tasks)


# --- 6. PostgreSQL connections terminated while work is in flight ---------------------------

TERMINATE = (
    "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


def test_terminated_database_connections_are_retried_and_change_nothing_twice(world, stack):
    w = world()
    agents = w.fleet("s6-a", "s6-b", capacity=2)
    tasks = w.create(24, [sleep_step(0.3), PWD], title="through terminations")
    w.wait_event("task.running", None, 20)
    started = time.monotonic()
    terminated = 0
    for _ in range(4):  # every session of the database: web, worker, control, the sampler
        terminated += sum(row["done"] for row in w.db.rows(TERMINATE))
        time.sleep(1.0)
    w.wait_done(tasks, 60, stack.worker, stack.web)
    done_after = time.monotonic() - started

    counts = w.check(tasks)
    retried = sum(
        "the server failed on frame" in line for a in agents for line in list(a.proc.lines)
    )
    web_errors = sum("OperationalError" in line for line in list(stack.web.lines))
    note(
        f"6 pg_terminate_backend x4 ({terminated} sessions): all done {done_after:.1f} s after "
        f"the first; {retried} frames resent after internal_error; web logged {web_errors} "
        f"OperationalError lines; {counts}"
    )


# --- 7. replayed and duplicated frames ----------------------------------------------------


def test_replayed_and_duplicated_frames_take_effect_once(world):
    w = world()
    raw = w.raw(w.device("s7-device"), "s7-raw")
    [task] = w.create(1, [PWD], title="replayed frames")
    offer = raw.expect(is_offer(task))
    ids = {"attempt_id": offer["attempt_id"], "epoch": offer["epoch"]}
    assert raw.call(protocol.Accept, **ids)["type"] == "ack"

    step = {"seq": 1, "kind": "step", "data": {"index": 0, "tool": "shell", "ok": True}}
    p1 = raw.send(protocol.Progress, **ids, **step)
    raw.send(protocol.Progress, p1, **ids, **step)  # the same id, back to back
    first, second = raw.answer(p1), raw.answer(p1)
    assert first == second and first["type"] == "ack", (first, second)
    log = raw.call(protocol.Progress, **ids, seq=2, kind="log", data={"line": "hello"})
    assert log["type"] == "ack" and log["result"]["event_seq"] > first["result"]["event_seq"]
    raw.close()
    raw.connect()  # within the grace; a resend after a reconnect is answered from the store
    assert raw.call(protocol.Progress, p1, **ids, **step) == first

    c1 = raw.send(protocol.Complete, **ids, result={"n": 1})
    raw.send(protocol.Complete, c1, **ids, result={"n": 1})
    done, again = raw.answer(c1), raw.answer(c1)
    assert done == again == {"type": "ack", "re": c1, "result": {"status": "succeeded"}}
    raw.close()
    raw.connect()
    assert raw.call(protocol.Complete, c1, **ids, result={"n": 1}) == done
    c2 = raw.call(protocol.Complete, **ids, result={"n": 2})  # a new id: a second complete
    assert (c2["type"], c2["code"]) == ("error", "stale_attempt"), c2
    late = raw.call(protocol.Progress, **ids, seq=3, kind="log", data={"line": "late"})
    assert (late["type"], late["code"]) == ("error", "stale_attempt"), late

    assert [e["payload"]["seq"] for e in w.events("progress.step", task)] == [1]
    assert [e["payload"]["seq"] for e in w.events("progress.log", task)] == [2]
    assert len(w.events("task.succeeded", task)) == 1
    assert [e["payload"]["frame"] for e in w.events("attempt.stale_write", task)] == [
        "complete",
        "progress",
    ]
    assert w.tasks([task])[task]["result"] == {"n": 1}
    counts = w.check([task])
    note(
        f"7 replays: 3x progress id -> 1 event, 3x complete id -> 1 success, new id stale; {counts}"
    )


# --- 8. two beat processes by mistake ------------------------------------------------------


def test_two_beats_by_mistake_change_nothing_twice(world, stack):
    w = world()
    first_lines = len(stack.beat.lines)
    second = stack.start_beat("beat-2")
    try:
        a, _ = w.fleet("s8-a", "s8-b", capacity=2)
        tasks = w.create(20, [sleep_step(0.4)], title="two beats")
        until(lambda: live_of(w, a.agent_id), 20, "a to hold work", a.proc)
        a.kill()
        w.wait_event("agent.offline", None, 15)
        lost_of_a = until(
            lambda: [e for e in w.events("attempt.lost") if e["agent_id"] == a.agent_id],
            15,
            "a's attempts lost",
        )
        w.start_agent(a.device, "s8-a", capacity=2).connected()
        w.wait_done(tasks, 60, stack.worker)
        sweeps = {
            beat.name: sum("Sending due task sweep leases" in line for line in lines)
            for beat, lines in (
                (stack.beat, stack.beat.lines[first_lines:]),
                (second, list(second.lines)),
            )
        }
    finally:
        second.close()
    counts = w.check(tasks)
    offline = [e for e in w.events("agent.offline") if e["agent_id"] == a.agent_id]
    assert len(offline) == 1, offline
    assert all(n > 0 for n in sweeps.values()), sweeps
    note(
        f"8 two beats: sweeps sent {sweeps}; {len(lost_of_a)} attempts of the killed agent "
        f"lost once each, one agent.offline; {counts}"
    )


# --- 9. an ambiguous commit: the claim committed, its assignment frame lost -----------------


def test_an_offer_whose_frame_was_lost_has_exactly_one_owner(world):
    w = world(lease_timeout_s=6, reconnect_grace_s=4)
    lease, grace = w.policies["lease_timeout_s"], w.policies["reconnect_grace_s"]
    p, q = w.fleet("s9-p", "s9-q")

    # a) The offer goes into a frozen agent's socket and dies with the process; the agent
    #    comes back within the grace and finds it in welcome.owned.
    p.signal(signal.SIGSTOP)
    [comes_back] = w.create(1, [PWD], title="offer into a dead socket", assign_to=p.agent_id)
    time.sleep(0.3)
    p.kill()
    again = w.start_agent(p.device, "s9-p")
    assert again.connected() == p.agent_id
    w.wait_done([comes_back], lease + 10, again.proc)
    again.proc.wait_for(r"resuming \(offered\)", 1)
    assert [(a["status"], a["agent_id"]) for a in w.attempts(comes_back)] == [
        ("succeeded", p.agent_id)
    ]

    # b) The same, but the agent never comes back: after the grace the offer is lost and
    #    the task runs on the other agent.
    again.signal(signal.SIGSTOP)
    [gone] = w.create(1, [PWD], title="offer to an agent that never returns", assign_to=p.agent_id)
    time.sleep(0.3)
    killed_at = time.time()
    again.kill()
    w.wait_done([gone], grace + lease + 10, q.proc)
    attempts = w.attempts(gone)
    assert [(a["status"], a["agent_id"]) for a in attempts] == [
        ("lost", p.agent_id),
        ("succeeded", q.agent_id),
    ]
    gone_lost_after = w.events("attempt.lost", gone)[0]["created_at"].timestamp() - killed_at

    # c) The frame is lost while the agent stays connected and heartbeating: the offer
    #    lapses at its deadline and the task is offered again.
    [lapses] = w.create(
        1, [PWD], title="offer frame dropped", assign_to=q.agent_id, drop_offer=True
    )
    w.wait_done([lapses], lease + 15, q.proc)
    attempts = w.attempts(lapses)
    assert [(a["status"], a["agent_id"]) for a in attempts] == [
        ("lost", q.agent_id),
        ("succeeded", q.agent_id),
    ]
    assert attempts[0]["failure_reason"] == "offer not accepted in time"
    lapsed_after = (attempts[0]["ended_at"] - attempts[0]["offered_at"]).total_seconds()
    counts = w.check([comes_back, gone, lapses])
    assert lease <= lapsed_after <= lease + 2, lapsed_after
    note(
        f"9 lost offer frame: resumed from welcome.owned (agent restarted in "
        f"{again.startup_s:.1f} s); never back -> lost after "
        f"{gone_lost_after:.1f} s; dropped while connected -> lapsed after {lapsed_after:.1f} s; "
        f"{counts}"
    )


# --- 10. beat down: failure detection runs on the maintenance leader -----------------------

# The groups in these scenarios keep the platform's default failover policies: the goals
# (kill -9 an agent -> its task running elsewhere within 15 s; a killed web process -> its
# agents' attempts moved within the grace + 2 s) are about the defaults.
DEFAULT_POLICIES = ("heartbeat_interval_s", "lease_timeout_s", "reconnect_grace_s")


def default_policies() -> dict:
    from apps.groups.models import Group

    return {name: Group._meta.get_field(name).default for name in DEFAULT_POLICIES}


def maintenance_leader(stack: Stack) -> dict | None:
    """The live maintenance lease: its holder ("host:pid:token") and deadline."""
    rows = stack.db.rows(
        "SELECT holder, expires_at FROM events_leader WHERE name = 'maintenance' "
        "AND expires_at > now()"
    )
    return rows[0] if rows else None


def leader_pid(stack: Stack) -> int | None:
    leader = maintenance_leader(stack)
    return int(leader["holder"].split(":")[1]) if leader else None


def running_on(w: World, task_id: int, agent_id: int) -> dict | None:
    return next(
        (a for a in w.attempts(task_id) if a["status"] == "running" and a["agent_id"] == agent_id),
        None,
    )


def test_with_beat_down_and_the_leading_worker_killed_a_dead_agent_still_loses_its_task(
    world, stack
):
    policies = default_policies()
    w = world(**policies)
    stack.beat.close()  # beat is down for the whole scenario
    first_worker = stack.worker
    second_worker = stack.start_worker()
    try:
        agents = w.fleet("s10-a", "s10-b")
        # One of the two workers holds the maintenance lease; kill -9 it: the other takes
        # over within the lease's few seconds.
        # (An earlier scenario's killed worker may still hold it for a few seconds.)
        ours = {first_worker.popen.pid, second_worker.popen.pid}
        holder_pid = until(
            lambda: leader_pid(stack) if leader_pid(stack) in ours else None,
            15,
            "one of these workers leading maintenance",
            first_worker,
        )
        leader = next(p for p in (first_worker, second_worker) if p.popen.pid == holder_pid)
        survivor = second_worker if leader is first_worker else first_worker
        killed_leader = time.monotonic()
        leader.kill()
        until(
            lambda: leader_pid(stack) == survivor.popen.pid,
            15,
            "the surviving worker to take the maintenance lease",
            survivor,
        )
        handed_over = time.monotonic() - killed_leader
        stack.worker = survivor

        [task] = w.create(1, [sleep_step(8), PWD], title="killed with beat down")
        first = live_attempt(w, task)
        holder = holder_of(agents, first)
        other = next(a for a in agents if a is not holder)
        holder.proc.wait_for(r"step 0: shell", 10)
        killed = time.monotonic()
        holder.kill()
        until(
            lambda: running_on(w, task, other.agent_id),
            15,
            "the task running on the other agent within 15 s",
            holder.proc,
            other.proc,
            survivor,
        )
        elsewhere_after = time.monotonic() - killed
        w.wait_done([task], 30)
        attempts = w.attempts(task)
        assert [(a["status"], a["agent_id"]) for a in attempts] == [
            ("lost", holder.agent_id),
            ("succeeded", other.agent_id),
        ]
        assert attempts[0]["failure_reason"] == "agent disconnected"
        counts = w.check([task])
    finally:
        stack.beat = stack.start_beat()
    assert elsewhere_after <= 15, elsewhere_after
    note(
        f"10 beat down {policies}: maintenance lease handed over {handed_over:.1f} s after "
        f"the leading worker's kill -9; agent kill -9 -> running elsewhere after "
        f"{elsewhere_after:.1f} s; {counts}"
    )


# --- 11. kill -9 a web process: its agents are disconnected since it was last seen ---------


def start_extra_web(stack: Stack, name: str, port: int) -> Proc:
    command = [
        PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port),
        "--websocket-max-message-size", str(protocol.MAX_FRAME_BYTES), "claw.asgi:application",
    ]  # fmt: skip
    web = stack._start(name, command, stack.env("claw-web"))
    wait_listening(port, 30, web)
    return web


def served_by(w: World, device: dict, base: str) -> dict:
    """The device's agents dial `base` instead of the stack's web process."""
    config = DeviceConfig(
        server=base,
        device_id=device["device_id"],
        token=device["token"],
        name=device["name"],
        kind="laptop",
        group_id=w.group_id,
    )
    save_config(config, device["config"])
    return device


def test_a_killed_web_process_costs_its_agents_the_grace_not_the_lease(world, stack):
    policies = default_policies()
    grace, lease = policies["reconnect_grace_s"], policies["lease_timeout_s"]
    w = world(**policies)
    port = free_port()
    web = start_extra_web(stack, "web 2", port)
    a = w.agent(served_by(w, w.device("s11-a-device"), f"http://127.0.0.1:{port}"), "s11-a")
    b = w.agent(w.device("s11-b-device"), "s11-b")  # on the stack's own web process

    # The process is killed and restarted at once: the agent reconnects within the grace
    # and keeps its attempt.
    [kept] = w.create(1, [sleep_step(grace + 4), PWD], title="kept", assign_to=a.agent_id)
    live_attempt(w, kept)
    killed = time.monotonic()
    web.kill()
    web = start_extra_web(stack, "web 2 again", port)
    a.connected(times=2)
    back_after = time.monotonic() - killed
    time.sleep(max(0.0, grace + 2 - (time.monotonic() - killed)))
    assert w.events("attempt.lost", kept) == []
    w.wait_done([kept], 20)
    assert [(x["status"], x["agent_id"]) for x in w.attempts(kept)] == [("succeeded", a.agent_id)]

    # Killed for good: the agent cannot reconnect; its attempt is lost after the grace
    # (counted from the process's last sign of life), not after the lease.
    [moved] = w.create(1, [sleep_step(4), PWD], title="moved", assign_to=a.agent_id)
    live_attempt(w, moved)
    killed_at = time.time()
    web.kill()
    lost = w.wait_event("attempt.lost", moved, grace + 5, a.proc)
    lost_after = lost["created_at"].timestamp() - killed_at
    w.wait_done([moved], 30, b.proc)
    attempts = w.attempts(moved)
    assert [(x["status"], x["agent_id"]) for x in attempts] == [
        ("lost", a.agent_id),
        ("succeeded", b.agent_id),
    ]
    assert attempts[0]["failure_reason"] == "agent disconnected"
    counts = w.check([kept, moved])
    assert lost_after <= grace + 2, (lost_after, grace, lease)
    note(
        f"11 web kill -9 {policies}: restarted at once -> agent back after {back_after:.1f} s, "
        f"attempt kept; killed for good -> attempt lost after {lost_after:.1f} s; {counts}"
    )
