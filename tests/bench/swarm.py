"""The swarm benchmark: services mode for real, as separate processes, driven by many
agents written from docs/protocol.md, with faults in the middle.

Started here, each in its own process group: a fresh PostgreSQL database (created and
migrated, dropped at the end), its own redis-server on a free port (or --redis-url), two web
processes (`python -m claw.web`) behind a round-robin TCP front (tests/bench/front.py), two
Celery workers (concurrency 2) and one beat. --drivers processes (tests/bench/swarm_driver.py)
run the --agents agents, each with its own device and websocket through the front. An
M-task layered DAG is created through the HTTP API (CREATORS: `graph`, the default, in one
POST /tasks/graph; `posts`, one POST per task, a layer at a time, --create-concurrency at
once), behind a gate task held for approval: the graph's execution is timed from the
gate's opening, apart from its creation (--no-gate: tasks run as they are created).
Mid-run (--fault-at, 40 % of the tasks done) 10 % of the agents are killed with -9 (one
driver holds exactly them), then one web process is killed with -9 and restarted after a
few seconds, then one worker (--no-faults: none).

Measured: wall time and tasks/s; ready -> offered (from the events: the task.assigned
event against the latest event that made the task ready), offer delivered at the agent
(attempt.offered_at -> the frame's arrival), offer -> accept on the server's clock,
complete -> ack (at the agents); lost (tasks not succeeded at the end), duplicated (a task
with two succeeded attempts, or acked "succeeded" twice at the agents), healthy attempts
lost (lost attempts whose agent was not killed), tasks failed although no agent failed one
(these agents never send `fail`), offers that arrived while the agent was still busy, peak
RSS of each process (its process group, from /proc), peak PostgreSQL connections (sampled
every 0.5 s), and the raw SQL floor: claim + complete with SELECT ... FOR UPDATE SKIP LOCKED
and UPDATE on a scratch table in the same database, in the same run. The headline is
tasks/s / floor. A table goes to stdout, a JSON report and a PNG plot to --out.

    python -m tests.bench.swarm --agents 300 --tasks 4000
    python -m tests.bench.swarm --agents 30 --tasks 300 --no-faults
    python -m tests.bench.swarm --agents 6 --tasks 30 --heartbeat-interval 1 --lease-timeout 4 \
        --reconnect-grace 2          # what the smoke test runs
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.common import bench_database, close_connections_before_fork, log, percentile

ROOT = Path(__file__).resolve().parent.parent.parent
LIVE_STATUSES = ("waiting", "ready", "assigned", "running", "review")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- the raw SQL floor -------------------------------------------------------------------

FLOOR_TABLE = "bench_swarm_floor"
FLOOR_CLAIM = """
SELECT id FROM bench_swarm_floor WHERE status = 'ready' ORDER BY id
LIMIT 1 FOR UPDATE SKIP LOCKED
"""
FLOOR_RUN = (
    "UPDATE bench_swarm_floor SET status = 'running', holder = %s, claimed_at = now() WHERE id = %s"
)
FLOOR_DONE = """
UPDATE bench_swarm_floor SET status = 'succeeded', done_at = now()
WHERE id = %s AND status = 'running' AND holder = %s
"""


def _floor_worker(url: str, index: int, barrier, results) -> None:
    """Claim one row (SKIP LOCKED) and mark it running in one transaction, then complete it
    (a compare-and-set) in another: the shape of an offer/accept and a complete."""
    import psycopg

    done = 0
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        barrier.wait()
        while True:
            with conn.transaction():
                row = conn.execute(FLOOR_CLAIM).fetchone()
                if row is None:
                    break
                conn.execute(FLOOR_RUN, [index, row[0]])
            with conn.transaction():
                done += conn.execute(FLOOR_DONE, [row[0], index]).rowcount
    results.put((index, done, time.perf_counter()))


def raw_floor(url: str, rows: int, processes: int) -> dict:
    """Claims + completes per second of `processes` raw SQL loops over `rows` rows."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {FLOOR_TABLE}")
        conn.execute(
            f"""CREATE TABLE {FLOOR_TABLE} (id bigserial PRIMARY KEY, status text NOT NULL,
                holder int, claimed_at timestamptz, done_at timestamptz)"""
        )
        conn.execute(
            "INSERT INTO bench_swarm_floor (status) SELECT 'ready' FROM generate_series(1, %s)",
            [rows],
        )
        conn.execute(f"CREATE INDEX ON {FLOOR_TABLE} (id) WHERE status = 'ready'")
        conn.execute(f"ANALYZE {FLOOR_TABLE}")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_floor_worker, args=(url, i, barrier, results)) for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=60)
        started = time.perf_counter()
        collected = [results.get(timeout=600) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    seconds = max(c[2] for c in collected) - started
    done = sum(c[1] for c in collected)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {FLOOR_TABLE}")
    return {"rows": done, "processes": processes, "seconds": seconds, "per_s": done / seconds}


# --- the processes -----------------------------------------------------------------------


def rss_kib(pgid: int) -> int:
    """VmRSS of every process in the process group `pgid`, in KiB."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) != pgid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total


class Stack:
    """PostgreSQL is already there; this starts redis (unless given), two web processes, the
    front, two workers and a beat, and the agent drivers. Every process is a tests.live.Proc
    in its own process group."""

    def __init__(self, workdir: Path, redis_url: str | None) -> None:
        from tests.live import free_port

        self.workdir = workdir
        self.redis_url = redis_url
        self.redis_port = free_port() if redis_url is None else None
        self.web_ports = [free_port(), free_port()]
        self.front_port = free_port()
        self.base = f"http://127.0.0.1:{self.front_port}"
        self.ws_url = f"ws://127.0.0.1:{self.front_port}/ws/agent/"
        self.procs: dict[str, object] = {}  # role -> current Proc
        self.retired: list = []  # killed or replaced Procs (their logs)
        self.lock = threading.Lock()

    def redis(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self, app: str) -> dict[str, str]:
        from tests.live import child_env

        claw = {k: v for k, v in os.environ.items() if k.startswith("CLAW_")}
        claw["CLAW_REDIS_URL"] = self.redis()
        url = claw["CLAW_DATABASE_URL"]
        claw["CLAW_DATABASE_URL"] = f"{url}{'&' if '?' in url else '?'}application_name={app}"
        return child_env(DJANGO_SETTINGS_MODULE="claw.settings", **{**claw, "CLAW_DEBUG": "0"})

    def _start(self, role: str, command: list[str], env: dict[str, str]):
        from tests.live import Proc

        proc = Proc(role, command, env)
        with self.lock:
            old = self.procs.get(role)
            if old is not None:
                self.retired.append(old)
            self.procs[role] = proc
        return proc

    def start_redis(self) -> None:
        from tests.live import child_env, wait_listening

        if self.redis_port is None:
            return
        command = [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        wait_listening(self.redis_port, 10, self._start("redis", command, child_env()))

    def start_web(self, n: int, wait: bool = True) -> None:
        from claw.cli import APPLICATION_CLOSE_TIMEOUT_S
        from claw.protocol import MAX_FRAME_BYTES
        from tests.live import PYTHON, wait_listening

        port = self.web_ports[n - 1]
        command = [
            PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port),
            "--websocket-max-message-size", str(MAX_FRAME_BYTES),
            "--application-close-timeout", str(APPLICATION_CLOSE_TIMEOUT_S),
            "claw.asgi:application",
        ]  # fmt: skip
        proc = self._start(f"web{n}", command, self.env(f"claw-web{n}"))
        if wait:
            wait_listening(port, 60, proc)

    def start_front(self) -> None:
        from tests.live import PYTHON, child_env, wait_listening

        command = [PYTHON, "-m", "tests.bench.front", "--listen", str(self.front_port)]
        for port in self.web_ports:
            command += ["--to", f"127.0.0.1:{port}"]
        wait_listening(self.front_port, 30, self._start("front", command, child_env()))

    def start_worker(self, n: int, wait: bool = True) -> None:
        from tests.live import PYTHON

        command = [
            PYTHON, "-m", "celery", "-A", "claw", "worker", "--loglevel", "INFO",
            "--concurrency", "2", "--hostname", f"swarm{n}-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        proc = self._start(f"worker{n}", command, self.env(f"claw-worker{n}"))
        if wait:
            proc.wait_for(r"\bready\.", 90)

    def start_beat(self) -> None:
        from tests.live import PYTHON

        command = [
            PYTHON, "-m", "celery", "-A", "claw", "beat", "--loglevel", "WARNING",
            "--schedule", str(self.workdir / "beat-schedule"),
        ]  # fmt: skip
        self._start("beat", command, self.env("claw-beat"))

    def start(self) -> None:
        from tests.live import wait_healthy, wait_listening

        self.start_redis()
        for n in (1, 2):  # all at once; then wait for each
            self.start_web(n, wait=False)
            self.start_worker(n, wait=False)
        self.start_beat()
        self.start_front()
        for n, port in enumerate(self.web_ports, 1):
            wait_listening(port, 90, self.procs[f"web{n}"])
        for n in (1, 2):
            self.procs[f"worker{n}"].wait_for(r"\bready\.", 90)
        wait_healthy(self.base, 90, *self.procs.values())
        self.started_at = {id(proc): len(proc.lines) for proc in self.procs.values()}

    def start_driver(self, n: int, config: dict) -> object:
        from tests.live import PYTHON, child_env

        path = self.workdir / f"driver{n}.json"
        path.write_text(json.dumps(config))
        command = [PYTHON, "-m", "tests.bench.swarm_driver", str(path)]
        return self._start(f"driver{n}", command, child_env())

    def kill(self, role: str) -> None:
        """kill -9 of the role's whole process group (a worker's pool children too)."""
        with self.lock:
            proc = self.procs[role]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def current(self) -> dict[str, int]:
        with self.lock:
            return {role: p.popen.pid for role, p in self.procs.items() if p.popen.poll() is None}

    def stop_drivers(self) -> None:
        with self.lock:
            drivers = [p for r, p in self.procs.items() if r.startswith(("driver", "victims"))]
        for proc in drivers:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        for proc in drivers:
            with contextlib.suppress(Exception):
                proc.popen.wait(15)

    def problems(self) -> list[str]:
        """Tracebacks the servers logged (a killed process's last words aside)."""
        found = []
        with self.lock:
            procs = [*self.procs.values(), *self.retired]
        for proc in procs:
            if not proc.name.startswith(("web", "worker", "beat")):
                continue
            since = getattr(self, "started_at", {}).get(id(proc), 0)
            bad = [ln for ln in proc.lines[since:] if "Traceback" in ln or " ERROR" in ln]
            if bad:
                found.append(f"{proc.name}: {len(bad)} error line(s), first: {bad[0][:200]}")
        return found

    def close(self, logs: Path | None) -> None:
        with self.lock:
            procs = [*self.procs.values(), *self.retired]
        for proc in procs:  # measured already: no graceful stop needed (drivers stopped)
            with contextlib.suppress(Exception):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.close()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for n, proc in enumerate(procs):
                (logs / f"{n:02d}-{proc.name}.log").write_text("\n".join(proc.lines) + "\n")


# --- sampling while it runs --------------------------------------------------------------


class Sampler(threading.Thread):
    """Every 0.5 s: tasks by status, PostgreSQL sessions on the bench database (by
    application), and the RSS of every process group of the stack."""

    def __init__(self, stack: Stack, url: str, database: str, group_id: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.url, self.database, self.group_id = stack, url, database, group_id
        self.samples: list[dict] = []
        self.rss_peak: dict[str, int] = {}
        self.halt = threading.Event()
        self.done = 0

    def run(self) -> None:
        import psycopg

        conn = None
        while not self.halt.is_set():
            started = time.time()
            sample: dict = {"t": started}
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                rows = conn.execute(
                    "SELECT status, count(*) FROM tasks_task WHERE group_id = %s GROUP BY status",
                    [self.group_id],
                ).fetchall()
                sample["tasks"] = dict(rows)
                self.done = sample["tasks"].get("succeeded", 0)
                rows = conn.execute(
                    """SELECT coalesce(nullif(application_name, ''), '?'), state, count(*)
                       FROM pg_stat_activity WHERE datname = %s GROUP BY 1, 2""",
                    [self.database],
                ).fetchall()
                sample["pg"] = sum(r[2] for r in rows)
                by_app: dict[str, int] = {}
                for app, _, count in rows:
                    by_app[app] = by_app.get(app, 0) + count
                sample["pg_by_app"] = by_app
                sample["pg_active"] = sum(r[2] for r in rows if r[1] == "active")
            except Exception as exc:  # the bench goes on; the gap shows in the samples
                sample["error"] = str(exc)[:200]
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
            rss = {role: rss_kib(pid) for role, pid in self.stack.current().items()}
            sample["rss_kib"] = rss
            for role, kib in rss.items():
                self.rss_peak[role] = max(self.rss_peak.get(role, 0), kib)
            self.samples.append(sample)
            self.halt.wait(max(0.0, 0.5 - (time.time() - started)))
        if conn is not None:
            conn.close()


# --- the task graph ----------------------------------------------------------------------


def layered_graph(tasks: int, layers: int, seed: int) -> list[list[list[int]]]:
    """For each layer, for each task: the indexes (in the layer before) it depends on."""
    rng = random.Random(seed)
    layers = max(1, min(layers, tasks))
    sizes = [tasks // layers + (i < tasks % layers) for i in range(layers)]
    graph = []
    for n, size in enumerate(sizes):
        if n == 0:
            graph.append([[] for _ in range(size)])
        else:
            before = sizes[n - 1]
            graph.append(
                [rng.sample(range(before), min(before, rng.randint(1, 3))) for _ in range(size)]
            )
    return graph


def api(base: str, token: str, method: str, path: str, body: dict | None = None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)  # noqa: S310
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    with NO_PROXY.open(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def create_gate(base: str, token: str, slug: str) -> int:
    """A task every first-layer task depends on, held for approval before it starts: the
    graph waits behind it while it is created, and approving it releases it all at once,
    so the execution path is measured apart from creation."""
    status, body = api(
        base,
        token,
        "POST",
        f"/api/v1/groups/{slug}/tasks",
        {"title": "swarm gate", "checkpoint_policy": "before_start"},
    )
    assert status == 201, body
    return body["id"]


def open_gate(base: str, token: str, slug: str, gate_id: int) -> None:
    for _ in range(100):
        _, page = api(base, token, "GET", f"/api/v1/groups/{slug}/checkpoints?status=pending")
        mine = [c["id"] for c in page["items"] if c["task_id"] == gate_id]
        if mine:
            api(
                base,
                token,
                "POST",
                f"/api/v1/checkpoints/{mine[0]}/decide",
                {"verdict": "approve"},
            )
            return
        time.sleep(0.1)
    raise RuntimeError("the gate task raised no before_start checkpoint")


def create_by_posts(
    base: str, token: str, slug: str, graph, concurrency: int, gate_id: int | None = None
) -> dict:
    """One POST /api/v1/groups/SLUG/tasks per task, a layer at a time (a task's dependencies
    must exist first), `concurrency` requests at once. A request that fails for a dropped
    connection is retried (the web process behind it may have been killed): it may, rarely,
    create a task twice, which the report shows as more tasks than asked for."""
    ids: list[list[int]] = []
    latencies: list[float] = []
    retries = 0
    gate = [gate_id] if gate_id is not None else []

    def post(payload: dict) -> int:
        nonlocal retries
        for attempt in range(10):
            started = time.perf_counter()
            try:
                status, body = api(base, token, "POST", f"/api/v1/groups/{slug}/tasks", payload)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                    raise
                retries += 1
                time.sleep(min(2.0, 0.2 * 2**attempt))
                continue
            latencies.append(time.perf_counter() - started)
            assert status == 201, body
            return body["id"]
        raise RuntimeError(f"could not create {payload['title']}")

    with ThreadPoolExecutor(concurrency) as pool:
        for n, layer in enumerate(graph):
            payloads = [
                {
                    "title": f"swarm L{n} #{i}",
                    "depends_on": [ids[n - 1][d] for d in deps] if n else gate,
                }
                for i, deps in enumerate(layer)
            ]
            ids.append(list(pool.map(post, payloads)))
    return {"ids": [i for layer in ids for i in layer], "latencies": latencies, "retries": retries}


def create_by_graph(
    base: str, token: str, slug: str, graph, concurrency: int, gate_id: int | None = None
) -> dict:
    """The whole graph in one POST /api/v1/groups/SLUG/tasks/graph, tasks naming each
    other by key."""
    tasks = [
        {
            "key": f"L{n}-{i}",
            "title": f"swarm L{n} #{i}",
            "depends_on": [f"L{n - 1}-{d}" for d in deps],
            "depends_on_ids": [gate_id] if gate_id is not None and n == 0 else [],
        }
        for n, layer in enumerate(graph)
        for i, deps in enumerate(layer)
    ]
    started = time.perf_counter()
    status, body = api(base, token, "POST", f"/api/v1/groups/{slug}/tasks/graph", {"tasks": tasks})
    assert status == 201, body
    ids = [body["ids"][task["key"]] for task in tasks]
    return {"ids": ids, "latencies": [time.perf_counter() - started], "retries": 0}


CREATORS = {"posts": create_by_posts, "graph": create_by_graph}


# --- faults ------------------------------------------------------------------------------


@dataclass
class Faults:
    at: float  # fraction of the tasks done
    events: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def inject_faults(stack: Stack, sampler: Sampler, faults: Faults, total: int, created, stop):
    """At faults.at of the tasks done: kill -9 the victims' driver; then (once the graph is
    created, so no POST is cut off) kill -9 web1 and start it again 3 s later; then kill -9
    worker1 and start it again 3 s later."""

    def wait_done(fraction: float) -> bool:
        while not stop.is_set():
            if sampler.done >= math.ceil(total * fraction):
                return True
            stop.wait(0.1)
        return False

    def mark(what: str) -> None:
        faults.events.append({"t": time.time(), "what": what, "done": sampler.done})
        log(f"fault: {what} ({sampler.done}/{total} done)")

    try:
        if not wait_done(faults.at):
            return
        if "victims" in stack.current():
            stack.kill("victims")
            mark("kill -9 of the victim agents' driver")
        while not created.is_set() and not stop.is_set():
            stop.wait(0.1)
        stop.wait(1)
        stack.kill("web1")
        mark("kill -9 of web1")
        stop.wait(3)
        stack.start_web(1)
        mark("web1 restarted")
        stop.wait(1)
        stack.kill("worker1")
        mark("kill -9 of worker1")
        stop.wait(3)
        stack.start_worker(1, wait=False)
        mark("worker1 restarted")
    except Exception as exc:  # reported, never hangs the run
        faults.errors.append(f"{type(exc).__name__}: {exc}")
        log(f"fault injection failed: {exc}")


# --- the run -----------------------------------------------------------------------------


def setup_group(agents: int, policies: dict) -> dict:
    from django.contrib.auth import get_user_model

    from apps.groups.services import api_token_create, group_create
    from tests.bench.matching import create_device

    stamp = time.time_ns()
    owner = get_user_model().objects.create_user(f"swarm-{stamp}", password=None)
    group = group_create(user=owner, name="swarm", slug=f"swarm-{stamp}", **policies)
    _, token = api_token_create(user=owner, name="swarm bench")
    specs = []
    for i in range(agents):
        _, device_token = create_device(group, f"swarm-device-{i}")
        specs.append({"name": f"agent-{i:05d}", "token": device_token})
    return {"group": group, "token": token, "agents": specs}


def read_records(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def stats(values: list[float], scale: float = 1000) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50) * scale,
        "p95": percentile(values, 95) * scale,
        "p99": percentile(values, 99) * scale,
        "max": (max(values) * scale) if values else float("nan"),
    }


READY_TO_OFFERED = """
SELECT a.attempt_id, extract(epoch FROM a.created_at),
       extract(epoch FROM a.created_at - r.created_at)
FROM events_event a
JOIN LATERAL (
    SELECT e.created_at FROM events_event e
    WHERE e.task_id = a.task_id AND e.seq < a.seq AND (
        e.kind IN ('task.ready', 'task.declined')
        OR (e.kind = 'task.created' AND e.payload->>'status' = 'ready')
        OR (e.kind IN ('attempt.lost', 'attempt.failed') AND e.payload->>'status' = 'ready'))
    ORDER BY e.seq DESC LIMIT 1
) r ON true
WHERE a.group_id = %s AND a.kind = 'task.assigned'
"""


def analyse(group_id: int, task_ids: list[int], victims: set[str], records: list[dict]) -> dict:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(READY_TO_OFFERED, [group_id])
        ready_rows = cursor.fetchall()
        cursor.execute(
            """SELECT a.id, a.task_id, a.status, g.name, extract(epoch FROM a.offered_at),
                      extract(epoch FROM a.started_at), a.failure_reason
               FROM tasks_attempt a JOIN devices_agent g ON g.id = a.agent_id
               JOIN tasks_task t ON t.id = a.task_id WHERE t.group_id = %s""",
            [group_id],
        )
        attempts = cursor.fetchall()
        cursor.execute(
            "SELECT status, count(*) FROM tasks_task WHERE group_id = %s GROUP BY status",
            [group_id],
        )
        by_status = dict(cursor.fetchall())
        cursor.execute(
            """SELECT extract(epoch FROM created_at) FROM events_event
               WHERE group_id = %s AND kind = 'task.succeeded' ORDER BY seq""",
            [group_id],
        )
        succeeded_at = [float(r[0]) for r in cursor.fetchall()]
        cursor.execute(
            "SELECT count(*) FROM events_event "
            "WHERE group_id = %s AND kind = 'attempt.stale_write'",
            [group_id],
        )
        stale_writes = cursor.fetchone()[0]
    offered_at = {a[0]: float(a[4]) for a in attempts}
    succeeded_per_task: dict[int, int] = {}
    lost_reasons: dict[str, int] = {}
    healthy_lost = killed_lost = 0
    for _, task_id, status, agent, _, _, reason in attempts:
        if status == "succeeded":
            succeeded_per_task[task_id] = succeeded_per_task.get(task_id, 0) + 1
        if status == "lost":
            key = reason.split(":")[0][:80] or "?"
            lost_reasons[key] = lost_reasons.get(key, 0) + 1
            if agent in victims:
                killed_lost += 1
            else:
                healthy_lost += 1
    acked: dict[int, int] = {}
    complete_ack, complete_series, delivered, busy_offers = [], [], [], 0
    accept_ack = []
    for r in records:
        if r["k"] == "complete" and r["code"] == "ok":
            acked[r["task"]] = acked.get(r["task"], 0) + 1
            complete_ack.append(r["ack"] - r["sent"])
            complete_series.append((r["ack"], r["ack"] - r["sent"]))
        elif r["k"] == "accept" and r["code"] == "ok":
            accept_ack.append(r["ack"] - r["sent"])
        elif r["k"] == "offer" and r["status"] == "offered" and r["source"] == "push":
            if r["attempt"] in offered_at:
                delivered.append(r["t"] - offered_at[r["attempt"]])
            busy_offers += bool(r["busy"])
    duplicated = {t for t, n in succeeded_per_task.items() if n > 1}
    duplicated |= {t for t, n in acked.items() if n > 1}
    offer_accept = [float(a[5]) - float(a[4]) for a in attempts if a[5] is not None]
    codes: dict[str, int] = {}
    for r in records:
        if r["k"] in ("accept", "complete") and r["code"] != "ok":
            key = f"{r['k']} {r['code']}"
            codes[key] = codes.get(key, 0) + 1
    return {
        "tasks_by_status": by_status,
        "lost": sum(n for s, n in by_status.items() if s != "succeeded"),
        "duplicated": len(duplicated),
        "failed_without_agent_failing": by_status.get("failed", 0) + by_status.get("blocked", 0),
        "attempts": len(attempts),
        "attempts_lost_healthy": healthy_lost,
        "attempts_lost_killed": killed_lost,
        "lost_reasons": lost_reasons,
        "stale_writes": stale_writes,
        "offers_while_busy": busy_offers,
        "agent_error_answers": codes,
        "drops": sum(r["k"] == "drop" for r in records),
        "ready_to_offered_ms": stats([float(r[2]) for r in ready_rows]),
        "offer_delivered_ms": stats(delivered),
        "offer_to_accept_server_ms": stats(offer_accept),
        "accept_to_ack_ms": stats(accept_ack),
        "complete_to_ack_ms": stats(complete_ack),
        "series": {
            "succeeded_at": succeeded_at,
            "ready_to_offered": sorted((float(r[1]), float(r[2])) for r in ready_rows),
            "complete_to_ack": sorted(complete_series),
        },
    }


def plot(report: dict, path: Path) -> str | None:
    """Tasks completed/s and the latencies over time, fault times marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install -e '.[dev]')")
        return None
    series, t0 = report["series"], report["started_at"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    done = [t - t0 for t in series["succeeded_at"]]
    if done:
        width = max(1, math.ceil(max(done) / 120))
        bins = list(range(0, int(max(done)) + width + 1, width))
        counts = [0] * (len(bins) - 1)
        for t in done:
            counts[min(int(t // width), len(counts) - 1)] += 1
        top.step(bins[:-1], [c / width for c in counts], where="post", label="tasks succeeded/s")
    top.set_ylabel("tasks/s")
    top.set_ylim(bottom=0)
    for name, color in (("ready_to_offered", "tab:orange"), ("complete_to_ack", "tab:green")):
        points = series[name]
        bottom.scatter(
            [t - t0 for t, _ in points], [v * 1000 for _, v in points], s=4, color=color,
            label=name.replace("_", " "), alpha=0.6,
        )  # fmt: skip
    bottom.set_yscale("symlog", linthresh=10)
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds since the graph's creation began")
    for axis in (top, bottom):
        for fault in report["faults"]["events"]:
            axis.axvline(fault["t"] - t0, color="red", alpha=0.4, linewidth=1)
        axis.legend(loc="upper right")
    top.set_title(
        f"swarm: {report['agents']} agents x {report['tasks']} tasks, "
        f"{report['tasks_per_s']:.1f} tasks/s (floor {report['floor']['per_s']:.0f}/s); "
        "red: faults"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def print_table(report: dict) -> None:
    def ms(name: str) -> str:
        s = report[name]
        return f"{s['p50']:.0f} / {s['p95']:.0f} / {s['p99']:.0f} ms (n {s['n']})"

    rss = ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(report["rss_peak_kib"].items()))
    rows = [
        ("agents x tasks", f"{report['agents']} x {report['tasks']} ({report['layers']} layers)"),
        ("faults", "on" if report["faults"]["on"] else "off"),
        ("graph created", f"{report['created']} tasks in {report['create_s']:.1f} s "
         f"({report['create_per_s']:.1f} tasks/s, {report['create_retries']} POSTs retried, "
         f"p50 POST {report['create_post_ms']['p50']:.0f} ms)"),
        ("wall time (creation start -> last done)", f"{report['wall_s']:.1f} s"),
        ("tasks/s end to end", f"{report['tasks_per_s']:.1f}"),
        ("raw SQL claim+complete floor", f"{report['floor']['per_s']:.0f}/s"),
        ("ratio tasks/s / floor", f"{report['ratio']:.4f}x"),
        ("ready -> offered p50/p95/p99", ms("ready_to_offered_ms")),
        ("offer delivered at the agent", ms("offer_delivered_ms")),
        ("offer -> accept (server clock)", ms("offer_to_accept_server_ms")),
        ("complete -> ack (at the agent)", ms("complete_to_ack_ms")),
        ("lost (tasks not succeeded)", report["lost"]),
        ("duplicated", report["duplicated"]),
        ("healthy attempts lost", report["attempts_lost_healthy"]),
        ("attempts lost (killed agents)", report["attempts_lost_killed"]),
        ("tasks failed, no agent failing", report["failed_without_agent_failing"]),
        ("offers while the agent was busy", report["offers_while_busy"]),
        ("peak PostgreSQL connections", f"{report['pg_peak']} (by app at peak: "
         f"{report['pg_peak_by_app']})"),
        ("peak RSS MiB", rss),
    ]  # fmt: skip
    print()
    print(f"swarm benchmark ({os.cpu_count()} cores; shared machines give pessimistic figures)")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"tasks by status: {report['tasks_by_status']}")
    print(f"lost attempts by reason: {report['lost_reasons']}")
    print(f"agent frames answered with an error: {report['agent_error_answers']}")
    for fault in report["faults"]["events"]:
        print(f"fault at +{fault['t'] - report['started_at']:.1f} s: {fault['what']}")
    for problem in report["problems"]:
        print(f"server log: {problem}")
    print(f"report: {report['report_path']}")
    print(f"plot: {report['plot_path']}")
    sys.stdout.flush()


def run(args, url: str, workdir: Path) -> dict:
    policies = {
        k: v
        for k, v in {
            "heartbeat_interval_s": args.heartbeat_interval,
            "lease_timeout_s": args.lease_timeout,
            "reconnect_grace_s": args.reconnect_grace,
            "max_attempts": args.max_attempts,
        }.items()
        if v is not None
    }
    database = urllib.parse.urlparse(url).path.lstrip("/")
    report: dict = {"agents": args.agents, "tasks": args.tasks, "faults": {"on": args.faults}}
    from django.db import connections

    close_connections_before_fork()  # the floor's processes are forked
    log(f"raw SQL floor: {args.floor_rows} rows, {args.floor_processes} processes")
    report["floor"] = raw_floor(url, args.floor_rows, args.floor_processes)
    log(f"raw SQL floor: {report['floor']['per_s']:.0f} claim+complete/s")
    setup = setup_group(args.agents, policies)
    group, token = setup["group"], setup["token"]
    connections.close_all()
    stack = Stack(workdir, args.redis_url)
    sampler = None
    stop = threading.Event()
    created = threading.Event()
    faults = Faults(at=args.fault_at)
    fault_thread = None
    try:
        log("starting redis, 2 web processes, the front, 2 workers and beat")
        stack.start()
        specs = setup["agents"]
        count = max(1, round(args.agents * args.kill_fraction)) if args.faults else 0
        count = min(count, max(0, args.agents - 1))
        victims, rest = specs[:count], specs[count:]
        drivers = max(1, min(args.drivers, len(rest)))
        config = {
            "url": stack.ws_url, "work_ms": [args.work_min_ms, args.work_max_ms],
            "capacity": args.capacity, "progress": args.progress,
        }  # fmt: skip
        outputs = []
        if victims:
            outputs.append(workdir / "victims.jsonl")
            stack.start_driver(0, {**config, "agents": victims, "out": str(outputs[-1])})
            with stack.lock:
                stack.procs["victims"] = stack.procs.pop("driver0")
        for n in range(drivers):
            outputs.append(workdir / f"driver{n + 1}.jsonl")
            share = rest[n::drivers]
            stack.start_driver(n + 1, {**config, "agents": share, "out": str(outputs[-1])})
        log(f"{args.agents} agents in {drivers} drivers (+1 holding {len(victims)} to kill)")
        with stack.lock:
            driver_procs = [p for r, p in stack.procs.items() if r.startswith(("driver", "vic"))]
        for proc in driver_procs:
            proc.wait_for(r"^welcomed \d+", args.connect_timeout)
        sampler = Sampler(stack, url, database, group.id)
        sampler.start()
        graph = layered_graph(args.tasks, args.layers, args.seed)
        if args.faults:
            fault_thread = threading.Thread(
                target=inject_faults,
                args=(stack, sampler, faults, args.tasks, created, stop),
                daemon=True,
            )
            fault_thread.start()
        log(f"creating {args.tasks} tasks in {len(graph)} layers ({args.create})")
        gate_id = create_gate(stack.base, token, group.slug) if args.gate else None
        started = time.time()
        made = CREATORS[args.create](
            stack.base, token, group.slug, graph, args.create_concurrency, gate_id
        )
        create_s = time.time() - started
        if gate_id is not None:
            open_gate(stack.base, token, group.slug, gate_id)
            made["ids"].append(gate_id)
            started = time.time()  # the execution path alone, from the gate's opening
        created.set()
        log(f"created in {create_s:.1f} s; waiting for the swarm")
        deadline = started + args.duration_limit
        timed_out = False
        while True:
            sample = sampler.samples[-1] if sampler.samples else {}
            tasks = sample.get("tasks", {})
            live = sum(tasks.get(s, 0) for s in LIVE_STATUSES)
            if tasks and sum(tasks.values()) >= len(made["ids"]) and live == 0:
                break
            if time.time() > deadline:
                timed_out = True
                log("duration limit reached: stopping")
                break
            time.sleep(0.2)
        if fault_thread is not None:
            fault_thread.join(max(1.0, deadline - time.time()))
        stop.set()
        stack.stop_drivers()
        sampler.halt.set()
        sampler.join(5)
        victim_names = {v["name"] for v in victims}
        records = read_records(outputs)
        result = analyse(group.id, made["ids"], victim_names, records)
        finished = result["series"]["succeeded_at"]
        end = max(finished) if finished else time.time()
        wall = end - started
        peak = max(sampler.samples, key=lambda s: s.get("pg", 0))
        report.update(result)
        report.update(
            {
                "layers": len(graph),
                "created": len(made["ids"]),
                "create": args.create,
                "create_s": create_s,
                "create_per_s": len(made["ids"]) / create_s if create_s else 0.0,
                "create_post_ms": stats(made["latencies"]),
                "create_retries": made["retries"],
                "started_at": started,
                "wall_s": wall,
                "timed_out": timed_out,
                "tasks_per_s": result["tasks_by_status"].get("succeeded", 0) / wall if wall else 0,
                "pg_peak": peak.get("pg", 0),
                "pg_peak_active": max(s.get("pg_active", 0) for s in sampler.samples),
                "pg_peak_by_app": peak.get("pg_by_app", {}),
                "rss_peak_kib": sampler.rss_peak,
                "victims": len(victims),
                "policies": policies,
                "problems": stack.problems(),
                "samples": [
                    {k: s.get(k) for k in ("t", "tasks", "pg", "pg_active")}
                    for s in sampler.samples
                ],
            }
        )
        report["ratio"] = report["tasks_per_s"] / report["floor"]["per_s"]
        report["faults"]["events"] = faults.events
        report["faults"]["errors"] = faults.errors
    finally:
        stop.set()
        if sampler is not None:
            sampler.halt.set()
        stack.close(Path(args.logs) if args.logs else workdir / "logs")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--layers", type=int, default=8, help="of the DAG")
    parser.add_argument("--no-faults", dest="faults", action="store_false")
    parser.add_argument("--fault-at", type=float, default=0.4, help="fraction of tasks done")
    parser.add_argument("--kill-fraction", type=float, default=0.1, help="of the agents")
    parser.add_argument("--drivers", type=int, default=4, help="+1 for the agents to kill")
    parser.add_argument("--capacity", type=int, default=1, help="of each agent")
    parser.add_argument("--work-min-ms", type=float, default=50)
    parser.add_argument("--work-max-ms", type=float, default=200)
    parser.add_argument("--progress", action="store_true", help="one progress frame per task")
    parser.add_argument("--create", choices=sorted(CREATORS), default="graph")
    parser.add_argument("--create-concurrency", type=int, default=16)
    parser.add_argument(
        "--no-gate",
        dest="gate",
        action="store_false",
        help="run tasks while the graph is created (default: held behind a gate task, "
        "released at once, and timed from then)",
    )
    parser.add_argument("--heartbeat-interval", type=int, default=None, help="group policy")
    parser.add_argument("--lease-timeout", type=int, default=None, help="group policy")
    parser.add_argument("--reconnect-grace", type=int, default=None, help="group policy")
    parser.add_argument("--max-attempts", type=int, default=None, help="group policy")
    parser.add_argument("--floor-rows", type=int, default=20_000)
    parser.add_argument("--floor-processes", type=int, default=4)
    parser.add_argument("--duration-limit", type=float, default=900, help="seconds")
    parser.add_argument("--connect-timeout", type=float, default=180, help="all agents welcomed")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "var" / "bench"))
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--redis-url", default=None, help="default: its own redis-server")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--logs", default=None, help="default: OUT/swarm-STAMP-logs")
    args = parser.parse_args()
    url = args.database_url or os.environ.get(
        "CLAW_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/claw_swarm_bench"
    )
    for where in (url, args.redis_url):
        if where and urllib.parse.urlparse(where).hostname not in ("127.0.0.1", "localhost"):
            parser.error("this benchmark only talks to 127.0.0.1")
    if args.agents < 1 or args.tasks < 1:
        parser.error("--agents and --tasks must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.logs is None:
        args.logs = str(out / f"swarm-{stamp}-logs")
    prefix = f"claw_swarm_{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="claw-bench-swarm-"))
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "claw.settings",
            "CLAW_DATABASE_URL": url,
            "CLAW_REDIS_URL": args.redis_url or "redis://127.0.0.1:6379/8",
            "CLAW_CHANNEL_PREFIX": prefix,
            "CLAW_CELERY_QUEUE": prefix,
            "CLAW_DATA_DIR": str(workdir / "data"),
            "CLAW_LOG_LEVEL": "WARNING",
        }
    )
    try:
        with bench_database(url, args.keep_database):
            report = run(args, url, workdir)
    finally:
        if args.redis_url:
            from tests.bench.common import forget_redis_keys

            with contextlib.suppress(Exception):
                forget_redis_keys(args.redis_url, prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    report["report_path"] = str(out / f"swarm-{stamp}.json")
    report["plot_path"] = plot(report, out / f"swarm-{stamp}.png")
    Path(report["report_path"]).write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    if report["lost"] or report["duplicated"] or report["timed_out"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
