"""Matching under load, services mode (PostgreSQL + Redis), on a fresh database per run.

(1) claims: --processes processes call `tasks_match` in loops over --groups groups until
    --claims ready tasks are assigned, with enough agents of capacity 256 that the matcher
    is the bottleneck. Then the database is checked: no task with two live/succeeded
    attempts, (task, epoch) unique, no agent over its capacity, one attempt and one
    task.assigned event per claim, gap-free event numbers. Baseline in the same run: as many
    processes claiming the same number of tasks with raw SQL over psycopg (SELECT … FOR
    UPDATE SKIP LOCKED, INSERT the attempt, UPDATE the task; one claim per transaction).
    Target: >= 1,000 assignments/s through the matcher.
(2) latency: a real Daphne, Celery worker and beat; protocol clients (asyncio `websockets`,
    claw.protocol frames) hold one attempt each (capacity 1) and loop: accept, `complete`,
    wait for the next `assignment`. Time from sending `complete` (which frees capacity: on
    commit the server matches that agent in-process, request_matching_for_agent) to the
    next assignment arriving. Target: p50 <= 50 ms.
(3) detection, with the group policy heartbeat 5 s, lease 12 s, reconnect grace 3 s (a
    lease must outlive two missed heartbeats plus the jitter and the sweeper's tick:
    2 x 5 x 1.1 + 1 = 12):
    - kill -9 of a real `python -m claw.device agent run` process holding a running task
      (the kernel closes its socket, so the server sees the close at once) -> seconds until
      the task runs on the other agent. Target: p95 <= 15 s.
    - frozen: SIGSTOP for good (the socket stays open and says nothing: a power cut or a
      partition, found only by the missing heartbeats) -> the same measure, p95 <= 15 s.
    - clean close: a protocol client holding a running task closes its socket (1000) ->
      reassignment. Target: <= grace + 2 s.
    - pause: SIGSTOP right after a heartbeat for 2 x heartbeat + 1 s, then SIGCONT -> the
      task must stay with that agent (two missed heartbeats are not a death).

Everything talks to 127.0.0.1, every wait is bounded, and every process started is stopped
on the way out; the database is dropped afterwards (--keep-database keeps it).

    python -m tests.bench.matching                                   # full size
    python -m tests.bench.matching --claims 20000 --latency-iterations 100 --trials 3
    python -m tests.bench.matching --phases claims --claims 100000
"""

import argparse
import asyncio
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
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.common import (
    bench_database,
    close_connections_before_fork,
    forget_redis_keys,
    log,
    percentile,
)

ROOT = Path(__file__).resolve().parent.parent.parent
TARGETS = {"claims_per_s": 1000, "latency_p50_ms": 50, "detection_p95_s": 15}
PHASES = ("claims", "latency", "detection")


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process on this machine has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(redis_url: str) -> float:
    import redis

    info = redis.Redis.from_url(redis_url, socket_timeout=5).info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


# --- (1) claims ----------------------------------------------------------------------------


@dataclass
class ClaimReport:
    mode: str  # "claw" (tasks_match) or "raw" (SQL over psycopg)
    claims: int
    processes: int
    seconds: float
    calls: int = 0
    cpu_client: float = 0.0  # CPU seconds of the claiming processes
    cpu_postgres: float = 0.0  # ... of their PostgreSQL backends
    cpu_redis: float = 0.0  # ... of redis-server meanwhile (shared: an upper bound)
    anomalies: list[str] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # claims/s of each round

    @property
    def cpu(self) -> float:
        return self.cpu_client + self.cpu_postgres + self.cpu_redis

    def ms_per_claim(self, seconds: float) -> float:
        return seconds * 1000 / self.claims if self.claims else float("nan")

    @property
    def per_second(self) -> float:
        return self.claims / self.seconds if self.seconds else 0.0


def create_claim_fleet(label: str, *, claims: int, groups: int, capacity: int) -> dict:
    """`groups` groups to share `claims` ready tasks (added by add_ready_tasks), each with
    enough agents (one device each) of `capacity` to take all of its tasks and some to
    spare."""
    from apps.devices.models import Agent, AgentStatus, Device
    from apps.groups.models import Group

    stamp = time.time_ns()
    plan: dict = {"groups": [], "agents": {}, "capacity": capacity, "claims": 0}
    for g in range(groups):
        tasks = claims // groups + (g < claims % groups)
        agents = math.ceil(tasks / capacity) + 2
        group = Group.objects.create(name=f"{label} {g}", slug=f"{label}-{g}-{stamp}")
        devices = Device.objects.bulk_create(
            Device(
                group=group,
                name=f"d{i}",
                token_hash=f"{label}-{g}-{i}-{stamp}".ljust(64, "x")[:64],
                token_prefix="x",
                paired_at="2026-01-01T00:00:00Z",
            )
            for i in range(agents)
        )
        fleet = Agent.objects.bulk_create(
            Agent(
                group=group,
                device=device,
                name=f"a{i}",
                toolkits={"shell": "1.0"},
                capacity=capacity,
                status=AgentStatus.ONLINE,
            )
            for i, device in enumerate(devices)
        )
        plan["groups"].append(group.id)
        plan["agents"][group.id] = [(a.id, a.device_id) for a in fleet]
    return plan


def add_ready_tasks(plan: dict, claims: int) -> None:
    """`claims` more ready tasks, spread over the plan's groups."""
    from django.db.models import F

    from apps.tasks.models import Task

    groups = plan["groups"]
    for g, group_id in enumerate(groups):
        tasks = claims // len(groups) + (g < claims % len(groups))
        for start in range(0, tasks, 5000):
            Task.objects.bulk_create(
                Task(group_id=group_id, title=f"t{i}", max_attempts=3, status="ready")
                for i in range(start, min(tasks, start + 5000))
            )
        Task.objects.filter(group_id=group_id, root=None).update(root_id=F("id"))
    plan["claims"] += claims


def _claw_worker(index: int, plan: dict, batch: int, barrier, results) -> None:
    from django.db import connections

    connections.close_all()  # never share the parent's socket
    from apps.tasks.matching import tasks_match
    from apps.tasks.models import Task

    groups = plan["groups"][index:] + plan["groups"][:index]
    claimed = calls = 0
    with connections["default"].cursor() as cursor:  # connect before the clock starts
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    barrier.wait()
    cpu = (time.process_time(), proc_cpu(backend))
    error = None
    try:
        while groups:
            for group_id in list(groups):
                offered = tasks_match(group_id=group_id, limit=batch)
                calls += 1
                claimed += len(offered)
                ready = Task.objects.filter(group_id=group_id, status="ready")
                if not offered and not ready.exists():
                    groups.remove(group_id)
    except Exception as exc:  # reported, never hangs the parent
        error = f"{type(exc).__name__}: {exc}"
    ended = time.perf_counter()
    used = (time.process_time() - cpu[0], proc_cpu(backend) - cpu[1])
    results.put((index, claimed, calls, ended, used, error))
    connections.close_all()


RAW_PICK = """
SELECT id, epoch FROM tasks_task
WHERE group_id = %s AND status = 'ready' AND (not_before IS NULL OR not_before <= now())
ORDER BY priority DESC, created_at, id
LIMIT 1 FOR UPDATE SKIP LOCKED
"""
RAW_ATTEMPT = """
INSERT INTO tasks_attempt
    (task_id, agent_id, device_id, epoch, status, lease_expires_at, offered_at,
     failure_reason, choice)
VALUES (%s, %s, %s, %s, 'offered', now() + interval '30 seconds', now(), '', '{}')
"""
RAW_TASK = "UPDATE tasks_task SET status = 'assigned', epoch = %s, updated_at = now() WHERE id = %s"


def _raw_worker(index: int, plan: dict, batch: int, barrier, results) -> None:
    import psycopg

    groups = plan["groups"][index:] + plan["groups"][:index]
    claimed = calls = 0
    error = None
    with psycopg.connect(os.environ["CLAW_DATABASE_URL"]) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()
        barrier.wait()
        cpu = (time.process_time(), proc_cpu(backend))
        try:
            while groups:
                for group_id in list(groups):
                    agents = plan["agents"][group_id]
                    calls += 1
                    for _ in range(batch):
                        with conn.transaction():
                            row = conn.execute(RAW_PICK, [group_id]).fetchone()
                            if row is None:
                                groups.remove(group_id)
                                break
                            task_id, epoch = row
                            agent_id, device_id = agents[(claimed + index) % len(agents)]
                            conn.execute(RAW_ATTEMPT, [task_id, agent_id, device_id, epoch + 1])
                            conn.execute(RAW_TASK, [epoch + 1, task_id])
                        claimed += 1
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        ended = time.perf_counter()
        used = (time.process_time() - cpu[0], proc_cpu(backend) - cpu[1])
    results.put((index, claimed, calls, ended, used, error))


def check_claims(plan: dict, report: ClaimReport) -> list[str]:
    """Invariants after a claim run, straight from the tables."""
    from django.db import connection

    anomalies = []
    groups = plan["groups"]
    with connection.cursor() as cursor:

        def scalar(sql: str, params: list) -> int:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]

        doubled = scalar(
            """SELECT count(*) FROM (SELECT a.task_id FROM tasks_attempt a
               JOIN tasks_task t ON t.id = a.task_id
               WHERE t.group_id = ANY(%s) AND a.status IN ('offered', 'running', 'succeeded')
               GROUP BY a.task_id HAVING count(*) > 1) d""",
            [groups],
        )
        if doubled:
            anomalies.append(f"{doubled} tasks with two live or succeeded attempts")
        epochs = scalar(
            """SELECT count(*) FROM (SELECT a.task_id, a.epoch FROM tasks_attempt a
               JOIN tasks_task t ON t.id = a.task_id WHERE t.group_id = ANY(%s)
               GROUP BY a.task_id, a.epoch HAVING count(*) > 1) d""",
            [groups],
        )
        if epochs:
            anomalies.append(f"{epochs} (task, epoch) pairs used twice")
        attempts = scalar(
            """SELECT count(*) FROM tasks_attempt a JOIN tasks_task t ON t.id = a.task_id
               WHERE t.group_id = ANY(%s)""",
            [groups],
        )
        assigned = scalar(
            """SELECT count(*) FROM tasks_task
               WHERE group_id = ANY(%s) AND status = 'assigned' AND epoch = 1""",
            [groups],
        )
        left = scalar(
            "SELECT count(*) FROM tasks_task WHERE group_id = ANY(%s) AND status <> 'assigned'",
            [groups],
        )
        if not attempts == assigned == report.claims == plan["claims"]:
            anomalies.append(
                f"{plan['claims']} tasks, {report.claims} claims reported, {attempts} attempts, "
                f"{assigned} tasks assigned at epoch 1"
            )
        if left:
            anomalies.append(f"{left} tasks were never assigned")
        if report.mode == "claw":
            over = scalar(
                """SELECT count(*) FROM (SELECT a.agent_id FROM tasks_attempt a
                   JOIN devices_agent g ON g.id = a.agent_id
                   WHERE g.group_id = ANY(%s) AND a.status IN ('offered', 'running')
                   GROUP BY a.agent_id, g.capacity HAVING count(*) > g.capacity) o""",
                [groups],
            )
            if over:
                anomalies.append(f"{over} agents over their capacity")
            events = scalar(
                """SELECT count(*) FROM events_event
                   WHERE group_id = ANY(%s) AND kind = 'task.assigned'""",
                [groups],
            )
            if events != attempts:
                anomalies.append(f"{events} task.assigned events for {attempts} attempts")
            cursor.execute(
                """SELECT group_id, count(*), count(DISTINCT seq), max(seq)
                   FROM events_event WHERE group_id = ANY(%s) GROUP BY group_id""",
                [groups],
            )
            for group_id, count, distinct, top in cursor.fetchall():
                if not count == distinct == top:
                    anomalies.append(f"group {group_id}: event seqs have gaps or duplicates")
    return anomalies


def claim_round(*, mode: str, plan: dict, claims: int, processes: int, batch: int):
    """Add `claims` ready tasks to the plan's groups and let `processes` processes claim
    them all (mode "claw": tasks_match; "raw": SQL). Returns this round's report."""
    from django.db import connection

    add_ready_tasks(plan, claims)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    close_connections_before_fork()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    target = _claw_worker if mode == "claw" else _raw_worker
    procs = [
        ctx.Process(target=target, args=(i, plan, batch, barrier, results))
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=120)
        started = time.perf_counter()
        redis_before = redis_cpu(os.environ["CLAW_REDIS_URL"])
        collected = [results.get(timeout=3600) for _ in procs]
        redis_used = redis_cpu(os.environ["CLAW_REDIS_URL"]) - redis_before
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    report = ClaimReport(
        mode=mode,
        claims=sum(c[1] for c in collected),
        processes=processes,
        seconds=max(c[3] for c in collected) - started,
        calls=sum(c[2] for c in collected),
        cpu_client=sum(c[4][0] for c in collected),
        cpu_postgres=sum(c[4][1] for c in collected),
        cpu_redis=redis_used,
    )
    report.anomalies = [f"process {c[0]} crashed: {c[5]}" for c in collected if c[5]]
    return report


def run_claims(
    *, claims: int, rounds: int, processes: int, groups: int, batch: int, capacity: int
) -> dict[str, ClaimReport]:
    """Both modes on fleets of the same shape, `claims` each, in `rounds` rounds in ABBA
    order (raw, claw, claw, raw, ...) so that a change in the machine's load meets both."""
    log(f"claims: fleets for {claims} tasks per mode in {groups} groups")
    plans = {
        mode: create_claim_fleet(f"claims-{mode}", claims=claims, groups=groups, capacity=capacity)
        for mode in ("raw", "claw")
    }
    totals = {
        mode: ClaimReport(mode=mode, claims=0, processes=processes, seconds=0.0) for mode in plans
    }
    for r in range(rounds):
        size = claims // rounds + (r < claims % rounds)
        for mode in ("raw", "claw") if r % 2 == 0 else ("claw", "raw"):
            one = claim_round(
                mode=mode, plan=plans[mode], claims=size, processes=processes, batch=batch
            )
            log(f"claims round {r + 1}/{rounds} ({mode}): {one.claims} at {one.per_second:.0f}/s")
            total = totals[mode]
            total.rounds.append(one.per_second)
            total.claims += one.claims
            total.seconds += one.seconds
            total.calls += one.calls
            total.cpu_client += one.cpu_client
            total.cpu_postgres += one.cpu_postgres
            total.cpu_redis += one.cpu_redis
            total.anomalies += one.anomalies
    for mode, total in totals.items():
        total.anomalies += check_claims(plans[mode], total)
    return totals


def queries_per_claim(capacity: int, batch: int) -> tuple[float, float, dict]:
    """One tasks_match call over `batch` ready tasks, its SQL counted by kind."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from apps.tasks.matching import tasks_match

    plan = create_claim_fleet("probe", claims=batch, groups=1, capacity=capacity)
    add_ready_tasks(plan, batch)
    with CaptureQueriesContext(connection) as captured:
        offered = tasks_match(group_id=plan["groups"][0], limit=batch)
    kinds: dict[str, int] = {}
    for query in captured.captured_queries:
        sql = query["sql"].lstrip().upper()
        kind = sql.split()[0]
        if kind == "SELECT" and "FOR UPDATE" in sql:
            kind = "SELECT FOR UPDATE"
        kinds[kind] = kinds.get(kind, 0) + 1
    claims = max(len(offered), 1)
    return len(captured.captured_queries) / claims, len(offered), kinds


def print_claims(raw: ClaimReport, claw: ClaimReport, probe: tuple, args) -> list[str]:
    per_claim, probed, kinds = probe
    print()
    print(
        f"(1) claims: {args.claims} ready tasks per mode in {args.groups} groups, agents of "
        f"capacity {args.capacity}, {args.processes} processes, {args.batch} tasks per "
        f"tasks_match call, {args.rounds} rounds in ABBA order"
    )
    print(
        f"{'mode':<6} {'claims':>8} {'seconds':>8} {'claims/s':>9} {'calls':>7} "
        f"{'cpu ms/claim: client':>21} {'postgres':>9} {'redis':>6} anomalies"
    )
    for r in (raw, claw):
        print(
            f"{r.mode:<6} {r.claims:>8} {r.seconds:>8.1f} {r.per_second:>9.0f} {r.calls:>7} "
            f"{r.ms_per_claim(r.cpu_client):>21.3f} {r.ms_per_claim(r.cpu_postgres):>9.3f} "
            f"{r.ms_per_claim(r.cpu_redis):>6.3f} {len(r.anomalies)}"
        )
        for anomaly in r.anomalies[:20]:
            print(f"  ANOMALY {r.mode}: {anomaly}")
    for r in (raw, claw):
        print(f"  {r.mode} claims/s by round: {', '.join(f'{x:.0f}' for x in r.rounds)}")
    ratio = claw.per_second / raw.per_second if raw.per_second else float("nan")
    print(f"claw/raw: {ratio:.2f}x")
    cost = claw.ms_per_claim(claw.cpu) / raw.ms_per_claim(raw.cpu) if raw.cpu else float("nan")
    print(
        f"cpu per claim (client + postgres + redis): raw {raw.ms_per_claim(raw.cpu):.3f} ms, "
        f"claw {claw.ms_per_claim(claw.cpu):.3f} ms ({cost:.2f}x); "
        f"{os.cpu_count()} cores would claim at most "
        f"{os.cpu_count() * 1000 / claw.ms_per_claim(claw.cpu):.0f}/s through the matcher"
    )
    shown = ", ".join(f"{k} {v / max(probed, 1):.1f}" for k, v in sorted(kinds.items()))
    print(f"queries per claim (one tasks_match over {probed} tasks): {per_claim:.1f} ({shown})")
    ok = claw.per_second >= TARGETS["claims_per_s"] and not claw.anomalies
    line = (
        f"target claims: {claw.per_second:.0f}/s through the matcher "
        f"(>= {TARGETS['claims_per_s']}), 0 anomalies: {verdict(ok)}"
    )
    print(line)
    return [] if ok else [line]


# --- servers and clients for (2) and (3) --------------------------------------------------


class Stack:
    """Daphne, a Celery worker and Celery beat on the bench database, like `claw up` in
    services mode; every process in its own group, all stopped by close()."""

    def __init__(self, workdir: Path, concurrency: int) -> None:
        from tests.live import free_port

        self.workdir, self.concurrency = workdir, concurrency
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"ws://127.0.0.1:{self.port}/ws/agent/"
        self.procs: list = []
        self.agents: dict[str, object] = {}  # agent name -> its Proc

    def env(self) -> dict[str, str]:
        from tests.live import child_env

        claw = {k: v for k, v in os.environ.items() if k.startswith("CLAW_")}
        # DEBUG off, as deployed: DEBUG keeps every query's SQL in memory.
        return child_env(DJANGO_SETTINGS_MODULE="claw.settings", **{"CLAW_DEBUG": "0", **claw})

    def start(self) -> None:
        from claw.cli import APPLICATION_CLOSE_TIMEOUT_S
        from claw.protocol import MAX_FRAME_BYTES
        from tests.live import PYTHON, Proc, wait_healthy, wait_listening

        celery = [PYTHON, "-m", "celery", "-A", "claw"]
        web = [
            PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(self.port),
            "--websocket-max-message-size", str(MAX_FRAME_BYTES),
            "--application-close-timeout", str(APPLICATION_CLOSE_TIMEOUT_S),
            "claw.asgi:application",
        ]  # fmt: skip
        worker = [
            *celery, "worker", "--loglevel", "INFO", "--concurrency", str(self.concurrency),
            "--hostname", f"bench{os.getpid()}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        beat = [
            *celery, "beat", "--loglevel", "WARNING",
            "--schedule", str(self.workdir / "beat-schedule"),
        ]  # fmt: skip
        daphne = Proc("daphne", web, self.env())
        self.procs.append(daphne)
        wait_listening(self.port, 60, daphne)
        worker_proc = Proc("worker", worker, self.env())
        self.procs.append(worker_proc)
        worker_proc.wait_for(r"\bready\.", 90)
        self.procs.append(Proc("beat", beat, self.env()))
        wait_healthy(self.base, 60, *self.procs)
        self.started_at = {proc.name: len(proc.lines) for proc in self.procs}

    def start_agent(self, name: str, config: Path) -> object:
        """A real `python -m claw.device agent run` process; returns once it is welcomed."""
        from tests.live import PYTHON, Proc, child_env

        command = [
            PYTHON, "-m", "claw.device", "agent", "run", "--name", name, "--toolkit", "shell",
            "--config", str(config), "--grace", "1",
        ]  # fmt: skip
        proc = Proc(f"agent {name}", command, child_env())
        self.agents[name] = proc
        proc.wait_for(r"connected to .* as agent \d+", 60)
        return proc

    def problems(self) -> list[str]:
        """Tracebacks and errors the servers logged while measured (not the /healthz 503s
        of the start, nor the workers' SIGTERM of the stop)."""
        found = []
        for proc in self.procs:
            since = getattr(self, "started_at", {}).get(proc.name, 0)
            until = getattr(self, "stopped_at", {}).get(proc.name, len(proc.lines))
            lines = proc.lines[since:until]
            bad = [i for i, ln in enumerate(lines) if "Traceback" in ln or " ERROR" in ln]
            if bad:
                heads = sorted({lines[i][24:200] for i in bad if " ERROR" in lines[i]})
                shown = "\n".join(lines[bad[0] : bad[0] + 30])
                found.append(
                    f"{proc.name} logged {len(bad)} error line(s):\n"
                    + "\n".join(heads[:20])
                    + f"\nthe first:\n{shown}"
                )
        return found

    def close(self, logs: Path | None = None) -> None:
        self.stopped_at = {proc.name: len(proc.lines) for proc in self.procs}
        for proc in [*self.agents.values(), *reversed(self.procs)]:
            with contextlib.suppress(Exception):
                proc.close()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for proc in [*self.procs, *self.agents.values()]:
                name = proc.name.replace(" ", "-")
                (logs / f"{name}.log").write_text("\n".join(proc.lines) + "\n")


def create_device(group, name: str) -> tuple[int, str]:
    from apps.devices.models import Device
    from claw.tokens import new_token, token_hash

    token = new_token("clawd")
    device = Device.objects.create(
        group=group,
        name=name,
        kind="cloud",
        token_hash=token_hash(token),
        token_prefix=token[:12],
        paired_at="2026-01-01T00:00:00Z",
    )
    return device.id, token


class ProtocolAgent:
    """One agent socket speaking claw.protocol frames (asyncio + websockets), paced under
    the server's per-socket rate limit. Pushes are queued with their arrival time."""

    RATE_PER_S = 40.0

    def __init__(self, url: str, token: str, name: str) -> None:
        self.url, self.token, self.name = url, token, name
        self.ws = None
        self.welcome: dict = {}
        self.assignments: asyncio.Queue = asyncio.Queue()
        self.answers: dict[str, asyncio.Future] = {}
        self.counter = 0
        self.tasks: list[asyncio.Task] = []
        self.next_send = 0.0

    async def open(self, timeout: float = 20) -> "ProtocolAgent":
        from websockets.asyncio.client import connect

        from claw import protocol

        self.ws = await connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.token}"},
            proxy=None,
            open_timeout=timeout,
            close_timeout=5,
        )
        hello = protocol.Hello(
            type="hello",
            id=self._id(),
            versions=[protocol.PROTOCOL_VERSION],
            agent=protocol.AgentInfo(
                name=self.name, toolkits={"shell": "1.0"}, capacity=1, client_version="bench"
            ),
        )
        await self.ws.send(hello.model_dump_json())
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.ws.recv())
                if frame["type"] == "welcome":
                    break
                if frame["type"] == "assignment":
                    self.assignments.put_nowait((frame, time.perf_counter(), time.time()))
                elif frame["type"] == "error":
                    raise RuntimeError(f"{self.name}: {frame['code']}: {frame['message']}")
        self.welcome = frame
        for owned in frame["owned"]:
            self.assignments.put_nowait((owned, time.perf_counter(), time.time()))
        self.tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._heartbeat(frame["heartbeat_interval_s"])),
        ]
        return self

    def _id(self) -> str:
        self.counter += 1
        return f"{self.name}-{os.getpid()}-{time.monotonic_ns()}-{self.counter}"

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            async for text in self.ws:
                arrived, wall = time.perf_counter(), time.time()
                frame = json.loads(text)
                if frame["type"] == "assignment":
                    self.assignments.put_nowait((frame, arrived, wall))
                elif frame["type"] in ("ack", "error") and frame.get("re") in self.answers:
                    future = self.answers.pop(frame["re"])
                    if not future.done():
                        future.set_result((frame, arrived))

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            with contextlib.suppress(Exception):
                await self.send("heartbeat")

    async def send(self, kind: str, **fields) -> asyncio.Future:
        """Send a frame (paced); returns a future of (answer, arrival time)."""
        from claw import protocol

        wait = self.next_send - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        self.next_send = max(self.next_send, time.perf_counter()) + 1 / self.RATE_PER_S
        frame_id = self._id()
        model = {
            "heartbeat": protocol.Heartbeat,
            "accept": protocol.Accept,
            "complete": protocol.Complete,
        }[kind]
        future = asyncio.get_running_loop().create_future()
        self.answers[frame_id] = future
        await self.ws.send(model(type=kind, id=frame_id, **fields).model_dump_json())
        return future

    async def request(self, kind: str, timeout: float = 10, **fields) -> dict:
        frame, _ = await asyncio.wait_for(await self.send(kind, **fields), timeout)
        if frame["type"] == "error":
            raise RuntimeError(f"{self.name} {kind}: {frame['code']}: {frame['message']}")
        return frame

    async def next_assignment(self, timeout: float, skip: set[int] = frozenset()):
        """(frame, arrival perf_counter, arrival wall time) of the next new assignment."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.assignments.get()
                if item[0]["attempt_id"] not in skip:
                    return item

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()


# --- (2) latency ---------------------------------------------------------------------------


@dataclass
class LatencyReport:
    agents: int
    iterations: int
    samples: list[dict] = field(default_factory=list)  # per iteration
    timeouts: int = 0
    errors: list[str] = field(default_factory=list)


async def _latency_agent(url: str, token: str, name: str, iterations: int, report) -> None:
    agent = await ProtocolAgent(url, token, name).open()
    try:
        frame, _, _ = await agent.next_assignment(timeout=30)
        seen = {frame["attempt_id"]}
        for i in range(iterations):
            ids = {"attempt_id": frame["attempt_id"], "epoch": frame["epoch"]}
            if frame["status"] == "offered":
                await agent.request("accept", **ids)
            answer = await agent.send("complete", result={"i": i}, **ids)
            sent, sent_wall = time.perf_counter(), time.time()
            try:
                frame, arrived, _ = await agent.next_assignment(timeout=10, skip=seen)
            except TimeoutError:
                report.timeouts += 1
                return
            ack, acked = await asyncio.wait_for(answer, 10)
            if ack["type"] == "error":
                report.errors.append(f"{name} complete: {ack['code']}")
            seen.add(frame["attempt_id"])
            report.samples.append(
                {
                    "latency": arrived - sent,
                    "ack": acked - sent,
                    "sent_wall": sent_wall,
                    "arrived_wall": sent_wall + (arrived - sent),
                    "attempt_id": frame["attempt_id"],
                }
            )
    finally:
        await agent.close()


def run_latency(stack: Stack, *, iterations: int, agents: int) -> LatencyReport:
    from django.db.models import F

    from apps.groups.models import Group
    from apps.tasks.models import Attempt, Task

    group = Group.objects.create(name="latency", slug=f"latency-{time.time_ns()}")
    tokens = [create_device(group, f"latency-{i}")[1] for i in range(agents)]
    Task.objects.bulk_create(
        Task(group=group, title=f"l{i}", max_attempts=3, status="ready")
        for i in range(agents * (iterations + 2))
    )
    Task.objects.filter(group=group).update(root_id=F("id"))
    report = LatencyReport(agents=agents, iterations=iterations)

    async def main() -> None:
        jobs = [
            _latency_agent(stack.url, token, f"latency-{i}", iterations, report)
            for i, token in enumerate(tokens)
        ]
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                report.errors.append(f"{type(result).__name__}: {result}")

    log(f"latency: {agents} agent(s) x {iterations} complete -> next assignment")
    asyncio.run(main())
    offered = dict(
        Attempt.objects.filter(id__in=[s["attempt_id"] for s in report.samples]).values_list(
            "id", "offered_at"
        )
    )
    for sample in report.samples:
        at = offered[sample["attempt_id"]].timestamp()
        sample["made"] = at - sample["sent_wall"]  # complete sent -> attempt inserted
        sample["pushed"] = sample["arrived_wall"] - at  # inserted -> frame received
    return report


def print_latency(report: LatencyReport, args) -> list[str]:
    def row(label: str, values: list[float]) -> str:
        cells = [percentile(values, q) * 1000 for q in (50, 95, 99)]
        top = max(values) * 1000 if values else float("nan")
        return f"{label:<44} {len(values):>5} " + " ".join(f"{v:>7.1f}" for v in [*cells, top])

    samples = report.samples
    print()
    print(
        f"(2) latency: `complete` sent -> next `assignment` received; {report.agents} protocol "
        f"agent(s) of capacity 1 x {report.iterations} iterations; Daphne, Celery worker "
        f"(--concurrency {args.celery_concurrency}) and beat"
    )
    print(f"{'':<44} {'n':>5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    print(row("complete -> next assignment", [s["latency"] for s in samples]))
    print(row("  complete -> its ack", [s["ack"] for s in samples]))
    print(row("  complete -> next attempt inserted", [s["made"] for s in samples]))
    print(row("  attempt inserted -> assignment received", [s["pushed"] for s in samples]))
    print(f"timeouts (no assignment within 10 s): {report.timeouts}; errors: {report.errors}")
    p50 = percentile([s["latency"] for s in samples], 50) * 1000
    complete = len(samples) == report.agents * report.iterations and not report.errors
    ok = complete and p50 <= TARGETS["latency_p50_ms"]
    line = (
        f"target latency: p50 {p50:.1f} ms (<= {TARGETS['latency_p50_ms']}), "
        f"{len(samples)}/{report.agents * report.iterations} iterations: {verdict(ok)}"
    )
    print(line)
    return [] if ok else [line]


# --- (3) detection -------------------------------------------------------------------------


@dataclass
class Trial:
    case: str
    seconds: float | None  # from the event to the task running on the other agent
    lost: float | None = None  # ... to the old attempt ending
    offered: float | None = None  # ... to the new attempt being offered
    kept: bool | None = None  # pause trials: the task stayed with its agent
    note: str = ""


def _wait(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    return None


def _running_attempt(task_id: int, *, not_agent: int | None = None):
    from apps.tasks.models import Attempt

    attempts = Attempt.objects.filter(task_id=task_id, status="running")
    if not_agent is not None:
        attempts = attempts.exclude(agent_id=not_agent)
    return attempts.order_by("-epoch").first()


def _measure(trial: Trial, task_id: int, holder: int, started: float, timeout: float) -> None:
    """Fill in when the task ran elsewhere, counted from `started` (a wall clock time)."""
    from apps.tasks.models import Attempt

    moved = _wait(lambda: _running_attempt(task_id, not_agent=holder), timeout)
    old = Attempt.objects.filter(task_id=task_id, agent_id=holder).order_by("-epoch").first()
    if old is not None and old.ended_at is not None:
        trial.lost = old.ended_at.timestamp() - started
    if moved is None:
        trial.note = f"not running elsewhere after {timeout:.0f} s"
        return
    trial.seconds = moved.started_at.timestamp() - started
    trial.offered = moved.offered_at.timestamp() - started


class Failover:
    """Two real agents (A, B: `python -m claw.device agent run`, capacity 1, shell) in one
    group, and two protocol agents in another, all under the same policy."""

    def __init__(self, stack: Stack, args) -> None:
        from django.contrib.auth import get_user_model

        from apps.groups.models import Group, Membership, Role
        from claw.device.config import DeviceConfig, save_config

        self.stack, self.args = stack, args
        policy = {
            "heartbeat_interval_s": args.heartbeat_interval,
            "lease_timeout_s": args.lease_timeout,
            "reconnect_grace_s": args.reconnect_grace,
        }
        stamp = time.time_ns()
        self.owner = get_user_model().objects.create_user(f"bench-{stamp}", password=None)
        self.group = Group.objects.create(name="failover", slug=f"failover-{stamp}", **policy)
        self.clean_group = Group.objects.create(name="clean", slug=f"clean-{stamp}", **policy)
        for group in (self.group, self.clean_group):
            Membership.objects.create(group=group, user=self.owner, role=Role.OWNER)
        self.configs: dict[str, Path] = {}
        for name in ("a", "b"):
            device_id, token = create_device(self.group, f"device-{name}")
            path = stack.workdir / f"agent-{name}" / "device.json"
            config = DeviceConfig(stack.base, device_id, token, f"device-{name}", "cloud")
            save_config(config, path)
            self.configs[name] = path
        self.clean_tokens = [create_device(self.clean_group, f"clean-{i}")[1] for i in range(2)]
        self.agent_ids: dict[str, int] = {}
        self.down: set[str] = set(self.configs)  # agents to (re)start before they are needed

    def start_agents(self) -> None:
        for name in sorted(self.down):
            proc = self.stack.start_agent(name, self.configs[name])
            line = [ln for ln in proc.lines if " as agent " in ln][-1]
            self.agent_ids[name] = int(line.split(" as agent ")[1].split()[0])
        self.down.clear()

    def create_task(self, group, title: str, *, steps: bool = True) -> int:
        from apps.tasks.services import task_create

        sleep = [{"tool": "shell.run", "args": {"cmd": "sleep 120", "timeout": 300}}]
        task = task_create(group=group, actor=self.owner, title=title, steps=sleep if steps else [])
        return task.id

    def cancel(self, task_id: int) -> None:
        from apps.tasks.models import Task
        from apps.tasks.services import task_cancel

        with contextlib.suppress(Exception):
            task_cancel(actor=self.owner, task=Task.objects.get(id=task_id), reason="bench")

    def holder(self, task_id: int, timeout: float = 30) -> tuple[str, int] | None:
        attempt = _wait(lambda: _running_attempt(task_id), timeout)
        if attempt is None:
            return None
        name = next(n for n, a in self.agent_ids.items() if a == attempt.agent_id)
        return name, attempt.agent_id

    def death(self, case: str, index: int) -> Trial:
        """kill: SIGKILL (the kernel closes the socket); frozen: SIGSTOP for good (the socket
        stays open and silent). Then the victim is killed and started again."""
        self.start_agents()  # the victim and the one that takes over
        task_id = self.create_task(self.group, f"{case} {index}")
        found = self.holder(task_id)
        if found is None:
            self.cancel(task_id)
            return Trial(case, None, note="the task never ran")
        name, agent_id = found
        proc = self.stack.agents[name]
        time.sleep(random.uniform(0, self.args.heartbeat_interval))  # any heartbeat phase
        started = time.time()
        if case == "kill":
            os.killpg(proc.popen.pid, signal.SIGKILL)
        else:
            os.kill(proc.popen.pid, signal.SIGSTOP)
        trial = Trial(case, None)
        _measure(trial, task_id, agent_id, started, timeout=self.args.lease_timeout + 30)
        self.cancel(task_id)
        proc.kill()  # the whole group, at once (a stopped process ignores SIGTERM)
        proc.close()
        self.down.add(name)
        return trial

    def pause(self, index: int) -> Trial:
        """SIGSTOP just after a heartbeat landed, for 2 x heartbeat + 1 s, then SIGCONT."""
        from apps.devices.models import Agent
        from apps.tasks.models import Attempt, Task

        hb = self.args.heartbeat_interval
        if len(self.down) == len(self.configs):
            self.start_agents()
        task_id = self.create_task(self.group, f"pause {index}")
        found = self.holder(task_id)
        if found is None:
            self.cancel(task_id)
            return Trial("pause", None, kept=False, note="the task never ran")
        name, agent_id = found
        proc = self.stack.agents[name]
        attempt = _running_attempt(task_id)
        beat = Agent.objects.get(id=agent_id).last_heartbeat_at
        landed = _wait(
            lambda: Agent.objects.filter(id=agent_id).exclude(last_heartbeat_at=beat).exists(),
            hb * 1.1 + 5,
            step=0.01,
        )
        os.kill(proc.popen.pid, signal.SIGSTOP)
        time.sleep(2 * hb + 1)
        os.kill(proc.popen.pid, signal.SIGCONT)
        time.sleep(hb + 2)  # its heartbeat goes out, the sweepers run
        attempt.refresh_from_db()
        task = Task.objects.get(id=task_id)
        others = Attempt.objects.filter(task_id=task_id).exclude(id=attempt.id).count()
        kept = attempt.status == "running" and task.epoch == attempt.epoch and others == 0
        note = "" if landed else "no heartbeat seen before the stop"
        if not kept:
            note = f"attempt {attempt.status}, task {task.status} epoch {task.epoch}, {others} more"
        self.cancel(task_id)
        return Trial("pause", None, kept=kept, note=note)

    async def clean_closes(self, trials: int) -> list[Trial]:
        """A protocol agent holding a running task closes its socket (1000)."""
        url, names = self.stack.url, ["clean-0", "clean-1"]
        agents = [
            await ProtocolAgent(url, token, name).open()
            for token, name in zip(self.clean_tokens, names, strict=True)
        ]
        results = []
        try:
            for index in range(trials):
                task_id = await asyncio.to_thread(
                    self.create_task, self.clean_group, f"clean {index}", steps=False
                )
                waits = [asyncio.create_task(a.next_assignment(timeout=30)) for a in agents]
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in pending:
                    wait.cancel()
                winner = waits.index(next(iter(done)))
                holder, other = agents[winner], agents[1 - winner]
                frame = waits[winner].result()[0]
                await holder.request("accept", attempt_id=frame["attempt_id"], epoch=frame["epoch"])
                held_by = holder.welcome["agent_id"]
                await asyncio.sleep(0.2)
                started = time.time()
                await holder.close()
                trial = Trial("clean", None)
                try:
                    moved, _, _ = await other.next_assignment(timeout=self.args.lease_timeout + 30)
                    await other.request(
                        "accept", attempt_id=moved["attempt_id"], epoch=moved["epoch"]
                    )
                except (TimeoutError, RuntimeError) as exc:
                    trial.note = f"no reassignment: {exc!r}"
                await asyncio.to_thread(_measure, trial, task_id, held_by, started, 5)
                await asyncio.to_thread(self.cancel, task_id)
                results.append(trial)
                agents[winner] = await ProtocolAgent(url, holder.token, holder.name).open()
        finally:
            for agent in agents:
                await agent.close()
            from django.db import connections

            await asyncio.to_thread(connections.close_all)
        return results


def run_detection(stack: Stack, args) -> list[Trial]:
    failover = Failover(stack, args)
    trials: list[Trial] = []
    for case, count in (("kill", args.kill_trials), ("frozen", args.frozen_trials)):
        for index in range(count):
            trials.append(failover.death(case, index))
            log(f"detection: {case} {index + 1}/{count}: {trials[-1]}")
    for index in range(args.pause_trials):
        trials.append(failover.pause(index))
        log(f"detection: pause {index + 1}/{args.pause_trials}: {trials[-1]}")
    if args.clean_trials:
        trials += asyncio.run(failover.clean_closes(args.clean_trials))
        log(f"detection: clean closes: {trials[-args.clean_trials :]}")
    return trials


def print_detection(trials: list[Trial], args) -> list[str]:
    hb, lease, grace = args.heartbeat_interval, args.lease_timeout, args.reconnect_grace
    print()
    print(
        f"(3) detection: group policy heartbeat {hb} s, lease {lease} s, reconnect grace "
        f"{grace} s; seconds from the event to the task running on the other agent"
    )
    print(
        f"{'case':<46} {'trials':>6} {'p50 s':>6} {'p95 s':>6} {'max s':>6} "
        f"{'lost p50':>8} {'offer p50':>9}  target"
    )
    misses = []
    cases = (
        ("kill", "kill -9 of a real agent (kernel closes socket)", TARGETS["detection_p95_s"]),
        ("frozen", "SIGSTOP for good (socket open, silent)", TARGETS["detection_p95_s"]),
        ("clean", "clean close (1000) by a protocol agent", grace + 2),
    )
    for case, label, limit in cases:
        rows = [t for t in trials if t.case == case]
        if not rows:
            continue
        took = [t.seconds for t in rows if t.seconds is not None]
        lost = [t.lost for t in rows if t.lost is not None]
        offered = [t.offered for t in rows if t.offered is not None]
        p95, top = percentile(took, 95), max(took, default=float("nan"))
        if case == "clean":
            ok = len(took) == len(rows) and top <= limit
            target = f"max <= {limit:g} s"
        else:
            ok = len(took) == len(rows) and p95 <= limit
            target = f"p95 <= {limit:g} s"
        print(
            f"{label:<46} {len(rows):>6} {percentile(took, 50):>6.1f} {p95:>6.1f} "
            f"{top:>6.1f} {percentile(lost, 50):>8.1f} {percentile(offered, 50):>9.1f}  "
            f"{target}: {verdict(ok)}"
        )
        for t in rows:
            if t.note:
                print(f"  {case}: {t.note}")
        if not ok:
            misses.append(f"target detection ({case}): {target}: MISS")
    pauses = [t for t in trials if t.case == "pause"]
    if pauses:
        kept = sum(bool(t.kept) for t in pauses)
        ok = kept == len(pauses)
        label = f"pause {2 * hb + 1} s (2 missed heartbeats), SIGCONT"
        print(
            f"{label:<46} {len(pauses):>6} kept by its agent: {kept}/{len(pauses)}: {verdict(ok)}"
        )
        for t in pauses:
            if t.note:
                print(f"  pause: {t.note}")
        if not ok:
            misses.append("target detection (pause): the task moved")
    return misses


# --- the database ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phases", default=",".join(PHASES), help="claims,latency,detection")
    size = parser.add_argument_group("(1) claims")
    size.add_argument("--claims", type=int, default=100_000, help="ready tasks per mode")
    size.add_argument("--processes", type=int, default=4)
    size.add_argument("--groups", type=int, default=8)
    size.add_argument("--batch", type=int, default=200, help="tasks_match(limit=…)")
    size.add_argument("--capacity", type=int, default=256, help="of each claiming agent")
    size.add_argument("--rounds", type=int, default=4, help="alternating raw/claw rounds")
    latency = parser.add_argument_group("(2) latency")
    latency.add_argument("--latency-iterations", type=int, default=300)
    latency.add_argument("--latency-agents", type=int, default=1)
    latency.add_argument("--celery-concurrency", type=int, default=2)
    detection = parser.add_argument_group("(3) detection")
    detection.add_argument("--trials", type=int, default=10, help="kill -9 and frozen trials")
    detection.add_argument("--frozen-trials", type=int, default=None, help="default: --trials")
    detection.add_argument("--clean-trials", type=int, default=5)
    detection.add_argument("--pause-trials", type=int, default=3)
    detection.add_argument("--heartbeat-interval", type=int, default=5)
    detection.add_argument("--lease-timeout", type=int, default=12)
    detection.add_argument("--reconnect-grace", type=int, default=3)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--logs", default=None, help="write the servers' and agents' logs here")
    args = parser.parse_args()
    args.kill_trials = args.trials
    if args.frozen_trials is None:
        args.frozen_trials = args.trials
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    if args.lease_timeout <= args.heartbeat_interval:
        parser.error("--lease-timeout must be longer than --heartbeat-interval")

    url = args.database_url or os.environ.get(
        "CLAW_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/claw_bench_matching"
    )
    for where in (url, args.redis_url):
        if urllib.parse.urlparse(where).hostname not in ("127.0.0.1", "localhost"):
            parser.error("this benchmark only talks to 127.0.0.1")
    prefix = f"claw_bench_matching_{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="claw-bench-matching-"))
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "claw.settings",
            "CLAW_DATABASE_URL": url,
            "CLAW_REDIS_URL": args.redis_url,
            "CLAW_CHANNEL_PREFIX": prefix,
            "CLAW_CELERY_QUEUE": prefix,
            "CLAW_DATA_DIR": str(workdir / "data"),
            "CLAW_BEAT_TICK_SECONDS": "1",
            "CLAW_LOG_LEVEL": "WARNING",
        }
    )
    misses: list[str] = []
    anomalies: list[str] = []
    try:
        with bench_database(url, args.keep_database):
            from django.core.management import call_command

            if "claims" in phases:
                reports = run_claims(
                    claims=args.claims,
                    rounds=max(1, min(args.rounds, args.claims)),
                    processes=args.processes,
                    groups=args.groups,
                    batch=args.batch,
                    capacity=args.capacity,
                )
                raw, claw = reports["raw"], reports["claw"]
                probe = queries_per_claim(args.capacity, min(args.batch, args.claims))
                misses += print_claims(raw, claw, probe, args)
                anomalies += raw.anomalies + claw.anomalies
                # The claimed attempts' leases would expire under the next phases' sweeper.
                call_command("flush", interactive=False, verbosity=0)
            if "latency" in phases or "detection" in phases:
                stack = Stack(workdir, args.celery_concurrency)
                try:
                    log("starting Daphne, a Celery worker and beat")
                    stack.start()
                    if "latency" in phases:
                        report = run_latency(
                            stack, iterations=args.latency_iterations, agents=args.latency_agents
                        )
                        misses += print_latency(report, args)
                        anomalies += report.errors
                    if "detection" in phases:
                        trials = run_detection(stack, args)
                        misses += print_detection(trials, args)
                    sys.stdout.flush()
                finally:
                    stack.close(Path(args.logs) if args.logs else None)
                for problem in stack.problems():
                    print(f"ANOMALY {problem}")
                    anomalies.append(problem)
    finally:
        forget_redis_keys(args.redis_url, prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"anomalies: {len(anomalies)}")
    print(f"targets missed: {len(misses)}")
    for miss in misses:
        print(f"  {miss}")
    sys.stdout.flush()
    if anomalies:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
