"""Agent sockets under load, services mode (PostgreSQL + Redis), one real server process.

For each server (Daphne, then Uvicorn, both serving claw.asgi:application), on a fresh
database with a group of N paired devices:
  (a) connections: N agents connect (Authorization: Bearer), say hello and heartbeat every
      heartbeat_interval_s (+-10 % jitter) for --duration seconds after the ramp. Reports
      the server's peak RSS (VmRSS, process tree), the connect rate, heartbeat ack latency
      and unexpected closes. Target: 5,000 agents, RSS <= 320 MB, no unexpected closes.
  (b) progress: M agents that each hold a running attempt send `progress` frames with
      unique ids, one outstanding per agent, paced under the per-socket rate limit. Reports
      acked events/s and ack latency p50/p95/p99, and checks that every ack is a stored
      progress.* event. Target: >= 1,000 events/s, p99 <= 100 ms.
  (c) baseline: the same client load against a plain `websockets` echo server (a separate
      process that answers every frame like Claw would, without doing anything): the
      Claw/echo ratios say how much of the cost is Claw's.
The client is a separate process (asyncio + `websockets`), everything talks to 127.0.0.1,
every wait is bounded, and every process started is stopped on the way out.

    python -m tests.bench.sockets --ramp-timeout 600    # full size: 20-40 min on 2 cores
    python -m tests.bench.sockets --agents 500 --duration 20     # quicker
    python -m tests.bench.sockets --agents 1000 --heartbeat-interval 2 --servers daphne \
        --no-echo --profile     # 500 heartbeats/s without the long ramp; py-spy per phase
Per server it also prints the server's CPU per heartbeat and per progress frame, its
busiest threads, how many database connections were busy and how often they waited on a
lock, and how many disconnects the server never recorded.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.common import bench_database, forget_redis_keys, percentile

ROOT = Path(__file__).resolve().parent.parent.parent
TARGETS = {"agents": 5000, "rss_mb": 320, "progress_per_s": 1000, "p99_ms": 100}
HELLO_AGENT = {"toolkits": {"shell": "1.0"}, "capacity": 1, "client_version": "bench"}


# --- small helpers ----------------------------------------------------------------------


def raise_open_files() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.0f}"  # NaN -> "-"


# --- the client process (python -m tests.bench.sockets --role client CONFIG) -------------


@dataclass
class ClientStats:
    connected: int = 0
    connect_failures: Counter = field(default_factory=Counter)
    connect_latencies: list[float] = field(default_factory=list)
    ramp_seconds: float = 0.0
    ramp_connected: int = 0
    latencies: list[float] = field(default_factory=list)  # heartbeat or progress acks
    acks: int = 0
    errors: Counter = field(default_factory=Counter)
    unexpected_closes: Counter = field(default_factory=Counter)
    timeouts: int = 0
    seconds: float = 0.0
    hold_acks: int = 0
    extensions: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        lat, con = self.latencies, self.connect_latencies
        return {
            "connected": self.connected,
            "connect_failures": dict(self.connect_failures),
            "ramp_seconds": self.ramp_seconds,
            "ramp_connected": self.ramp_connected,
            "connect_p50": percentile(con, 50),
            "connect_p99": percentile(con, 99),
            "acks": self.acks,
            "errors": dict(self.errors),
            "unexpected_closes": dict(self.unexpected_closes),
            "timeouts": self.timeouts,
            "seconds": self.seconds,
            "hold_acks": self.hold_acks,
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "mean": statistics.fmean(lat) if lat else float("nan"),
            "extensions": dict(self.extensions),
        }


async def _open(cfg: dict, token: str, name: str, stats: ClientStats):
    from websockets.asyncio.client import connect

    ws = await connect(
        cfg["url"],
        additional_headers={"Authorization": f"Bearer {token}"},
        user_agent_header="claw-bench",
        open_timeout=cfg["open_timeout"],
        close_timeout=5,
        max_size=16 * 256 * 1024,
        compression=None if cfg["no_compression"] else "deflate",
    )
    extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    stats.extensions[extensions.split(";")[0] or "none"] += 1
    hello = {"type": "hello", "id": "hello", "versions": [1], "agent": {"name": name}}
    hello["agent"].update(HELLO_AGENT)
    await ws.send(json.dumps(hello))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), cfg["open_timeout"]))
    if welcome.get("type") != "welcome":
        await ws.close()
        raise RuntimeError(f"no welcome: {welcome.get('code')}")
    return ws, welcome


async def _answer(ws, frame_id: str, timeout: float) -> dict:
    """The ack or error for frame_id (pushes and other frames are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if frame.get("re") == frame_id and frame.get("type") in {"ack", "error"}:
            return frame


async def connections_phase(cfg: dict) -> ClientStats:
    from websockets.exceptions import ConnectionClosed

    stats = ClientStats()
    gate = asyncio.Semaphore(cfg["connect_concurrency"])
    stop = asyncio.Event()
    interval = cfg["heartbeat_interval"]
    sockets = []

    async def agent(index: int, token: str) -> None:
        async with gate:
            started = time.monotonic()
            try:
                ws, _ = await _open(cfg, token, "idle", stats)
            except Exception as exc:
                stats.connect_failures[f"{type(exc).__name__}: {exc}"[:60]] += 1
                return
            stats.connect_latencies.append(time.monotonic() - started)
            stats.connected += 1
            sockets.append(ws)
        beat = 0
        try:
            with contextlib.suppress(TimeoutError):  # first beat anywhere in one interval
                await asyncio.wait_for(stop.wait(), random.uniform(0, interval))
            while not stop.is_set():
                beat += 1
                frame_id = f"hb{beat}"
                sent = time.monotonic()
                await ws.send(json.dumps({"type": "heartbeat", "id": frame_id}))
                try:
                    answer = await _answer(ws, frame_id, cfg["ack_timeout"])
                except TimeoutError:
                    stats.timeouts += 1
                    continue
                stats.latencies.append(time.monotonic() - sent)
                if answer["type"] == "ack":
                    stats.acks += 1
                else:
                    stats.errors[answer.get("code")] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval * random.uniform(0.9, 1.1))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else "no close frame"
            stats.unexpected_closes[str(code)] += 1
        except Exception as exc:
            stats.unexpected_closes[type(exc).__name__] += 1

    started = time.monotonic()
    tasks = [asyncio.create_task(agent(i, token)) for i, token in enumerate(cfg["tokens"], start=1)]
    ramp_deadline = started + cfg["ramp_timeout"]
    next_report = started + 10
    while stats.connected + sum(stats.connect_failures.values()) < len(tasks):
        if time.monotonic() > ramp_deadline:  # the rest may still connect during the hold
            log(f"ramp deadline: {stats.connected} connected, the rest still trying")
            break
        if time.monotonic() > next_report:
            next_report += 10
            failed = sum(stats.connect_failures.values())
            log(f"ramp: {stats.connected} connected, {failed} failed")
        await asyncio.sleep(0.1)
    stats.ramp_seconds = time.monotonic() - started
    stats.ramp_connected = stats.connected
    log(f"ramp: {stats.connected}/{len(tasks)} connected in {stats.ramp_seconds:.1f}s")
    if cfg.get("marker"):  # tells the orchestrator's sampler that the hold starts now
        Path(cfg["marker"]).write_text("ramped")
    hold_started, acks_before = time.monotonic(), stats.acks
    await asyncio.sleep(cfg["duration"])
    stop.set()
    stats.seconds = time.monotonic() - hold_started
    stats.hold_acks = stats.acks - acks_before
    await asyncio.wait(tasks, timeout=cfg["ack_timeout"] + 10)
    for task in tasks:
        task.cancel()
    closes = [asyncio.wait_for(ws.close(), 10) for ws in sockets]
    await asyncio.gather(*closes, return_exceptions=True)
    return stats


async def progress_phase(cfg: dict) -> ClientStats:
    from websockets.exceptions import ConnectionClosed

    stats = ClientStats()
    gate = asyncio.Semaphore(cfg["connect_concurrency"])
    everyone = asyncio.Event()
    ready = []
    period = 1 / cfg["progress_rate"]
    padding = "x" * cfg["progress_bytes"]
    window: dict[str, float] = {}

    async def agent(index: int, token: str) -> None:
        async with gate:
            try:
                ws, welcome = await _open(cfg, token, "busy", stats)
            except Exception as exc:
                stats.connect_failures[f"{type(exc).__name__}: {exc}"[:60]] += 1
                ready.append(None)
                return
        stats.connected += 1
        ready.append(ws)
        try:
            owned = welcome["owned"][0]
            await everyone.wait()
            start, end = window["start"], window["end"]
            seq = 0
            while time.monotonic() < end:
                seq += 1
                frame_id = f"p{index}-{seq}"
                frame = {
                    "type": "progress",
                    "id": frame_id,
                    "attempt_id": owned["attempt_id"],
                    "epoch": owned["epoch"],
                    "seq": seq,
                    "kind": "log",
                    "data": {"line": padding},
                }
                sent = time.monotonic()
                await ws.send(json.dumps(frame))
                try:
                    answer = await _answer(ws, frame_id, cfg["ack_timeout"])
                except TimeoutError:
                    stats.timeouts += 1
                    break
                stats.latencies.append(time.monotonic() - sent)
                if answer["type"] == "ack":
                    stats.acks += 1
                else:
                    stats.errors[answer.get("code")] += 1
                delay = start + seq * period - time.monotonic()  # paced, never bursting
                if delay > 0:
                    await asyncio.sleep(delay)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else "no close frame"
            stats.unexpected_closes[str(code)] += 1
        except Exception as exc:
            stats.unexpected_closes[type(exc).__name__] += 1
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 10)

    tasks = [asyncio.create_task(agent(i, token)) for i, token in enumerate(cfg["tokens"], start=1)]
    deadline = time.monotonic() + cfg["ramp_timeout"]
    while len(ready) < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    window["start"] = time.monotonic()
    window["end"] = window["start"] + cfg["duration"]
    everyone.set()
    await asyncio.wait(tasks, timeout=cfg["duration"] + cfg["ack_timeout"] + 20)
    stats.seconds = time.monotonic() - window["start"]
    for task in tasks:
        task.cancel()
    return stats


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_client(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    limits = raise_open_files()
    phase = connections_phase if cfg["phase"] == "connections" else progress_phase
    stats = asyncio.run(asyncio.wait_for(phase(cfg), cfg["hard_timeout"]))
    print(json.dumps({**stats.as_dict(), "client_nofile": limits}))


# --- the echo baseline (python -m tests.bench.sockets --role echo PORT) ------------------


def run_echo(port: int) -> None:
    """Answers hello with a welcome and every other frame with an ack, like Claw, and
    does nothing else: the cost of the socket and JSON round trip alone."""
    from websockets.asyncio.server import serve

    raise_open_files()
    counter = iter(range(1, 1 << 62))

    async def handler(ws) -> None:
        async for text in ws:
            frame = json.loads(text)
            if frame.get("type") == "hello":
                owned = [{"type": "assignment", "attempt_id": 1, "epoch": 1, "status": "running"}]
                answer = {"type": "welcome", "re": frame["id"], "owned": owned, "decisions": []}
            elif frame.get("type") == "progress":
                answer = {"type": "ack", "re": frame["id"], "result": {"event_seq": next(counter)}}
            else:
                answer = {"type": "ack", "re": frame["id"], "result": {"leases_extended": 0}}
            await ws.send(json.dumps(answer))

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port, max_size=256 * 1024, backlog=1024):
            print(f"echo listening on {port}", flush=True)
            await asyncio.Future()

    asyncio.run(main())


# --- the orchestrator -------------------------------------------------------------------


class Sampler(threading.Thread):
    """Peak VmRSS of a process tree, its CPU seconds per thread, and how many database
    connections are busy at once, sampled every 0.25 s."""

    def __init__(self, pid: int, database: str | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.database = pid, database
        self.peak_kb = 0
        self.max_db_active = 0
        self.max_db_connections = 0
        self.active_samples = self.lock_samples = 0  # backends busy / waiting on a lock
        self.marker: Path | None = None
        self.marked: tuple[float, float] | None = None  # (time, process CPU) at the marker
        self.halt = threading.Event()

    def tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    path = f"/proc/{pid}/task/{task}/children"
                    todo.extend(int(c) for c in Path(path).read_text().split())
        return pids

    def rss_kb(self) -> int:
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def thread_cpu(self) -> dict[int, float]:
        """CPU seconds per thread of the server process."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
                    fields = stat.rsplit(")", 1)[1].split()
                    out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def run(self) -> None:
        conn = None
        if self.database:
            import psycopg

            conn = psycopg.connect(self.database, autocommit=True)
        try:
            while not self.halt.is_set():
                self.peak_kb = max(self.peak_kb, self.rss_kb())
                if self.marked is None and self.marker is not None and self.marker.exists():
                    self.marked = (time.monotonic(), sum(self.thread_cpu().values()))
                if conn is not None:
                    row = conn.execute(
                        "SELECT count(*), count(*) FILTER (WHERE state = 'active'), "
                        "count(*) FILTER (WHERE state = 'active' AND wait_event_type = 'Lock') "
                        "FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()"
                    ).fetchone()
                    self.max_db_connections = max(self.max_db_connections, row[0])
                    self.max_db_active = max(self.max_db_active, row[1])
                    self.active_samples += row[1]
                    self.lock_samples += row[2]
                self.halt.wait(0.1)
        finally:
            if conn is not None:
                conn.close()

    def reset(self) -> None:
        self.peak_kb = self.rss_kb()
        self.max_db_active = self.max_db_connections = 0
        self.active_samples = self.lock_samples = 0

    def db_summary(self) -> str:
        waiting = self.lock_samples / self.active_samples if self.active_samples else 0
        return (
            f"max {self.max_db_connections} open / {self.max_db_active} active, "
            f"{waiting:.0%} of busy-backend samples waiting on a lock"
        )

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def busiest_threads(before: dict[int, float], after: dict[int, float], seconds: float) -> str:
    used = sorted(((after[tid] - before.get(tid, 0.0), tid) for tid in after), reverse=True)
    total = sum(u for u, _ in used)
    top = ", ".join(f"{u / seconds:.0%}" for u, _ in used[:3] if u > 0)
    return f"{total / seconds:.0%} of a core (busiest threads {top or '-'}), {len(after)} threads"


@dataclass
class Setup:
    group_id: int
    idle_tokens: list[str]
    busy_tokens: list[str]


def create_fleet(label: str, agents: int, busy: int) -> Setup:
    """A group with `agents` idle devices and `busy` devices whose agent holds a running
    attempt, straight through the ORM and the task services."""
    from django.db.models import F
    from django.utils import timezone

    from apps.devices.models import Agent, AgentStatus, Device
    from apps.groups.models import Group
    from apps.tasks.models import Task
    from apps.tasks.services import attempt_accept, task_assign
    from claw.tokens import new_token, token_hash

    stamp = time.time_ns()
    group = Group.objects.create(name=f"bench {label}", slug=f"bench-{label}-{stamp}"[:50])
    now = timezone.now()

    def devices(prefix: str, count: int) -> tuple[list[Device], list[str]]:
        tokens = [new_token("clawd") for _ in range(count)]
        rows = Device.objects.bulk_create(
            [
                Device(
                    group=group,
                    name=f"{prefix}{i}",
                    kind="cloud",
                    token_hash=token_hash(raw),
                    token_prefix=raw[:12],
                    paired_at=now,
                )
                for i, raw in enumerate(tokens)
            ],
            batch_size=1000,
        )
        return rows, tokens

    _, idle_tokens = devices("idle", agents)
    busy_devices, busy_tokens = devices("busy", busy)
    holders = Agent.objects.bulk_create(
        [
            Agent(
                group=group,
                device=device,
                name="busy",
                toolkits=HELLO_AGENT["toolkits"],
                capacity=1,
                status=AgentStatus.ONLINE,
            )
            for device in busy_devices
        ]
    )
    tasks = Task.objects.bulk_create(
        [Task(group=group, title=f"bench {i}", max_attempts=3, status="ready") for i in range(busy)]
    )
    Task.objects.filter(group=group).update(root_id=F("id"))
    for agent, task in zip(holders, tasks, strict=True):
        attempt = task_assign(task_id=task.id, agent_id=agent.id)
        attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)
    return Setup(group.id, idle_tokens, busy_tokens)


def run_client_phase(cfg: dict, workdir: Path, timeout: float) -> dict:
    path = workdir / f"client-{cfg['phase']}.json"
    path.write_text(json.dumps(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.sockets", "--role", "client", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,  # the result; its log goes straight to our stderr
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"client failed ({result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_disconnected(group_id: int, timeout: float) -> tuple[float, int]:
    """Seconds until the server has recorded the group's agents as disconnected, and how
    many it never did (waiting stops once nothing has changed for 15 s)."""
    from apps.devices.models import Agent

    started = last_change = time.monotonic()
    left = previous = -1
    while time.monotonic() - started < timeout and time.monotonic() - last_change < 15:
        left = Agent.objects.filter(group_id=group_id).exclude(connection="").count()
        if left == 0:
            break
        if left != previous:
            previous, last_change = left, time.monotonic()
        time.sleep(0.5)
    return time.monotonic() - started, left


def server_command(kind: str, port: int) -> list[str]:
    bindir = Path(sys.executable).parent
    from claw.cli import APPLICATION_CLOSE_TIMEOUT_S

    limit = str(256 * 1024)  # as `claw up` runs Daphne (claw/cli.py)
    if kind == "daphne":
        return [
            *(sys.executable, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port), "-v", "0"),
            *("--websocket-max-message-size", limit),
            *("--application-close-timeout", str(APPLICATION_CLOSE_TIMEOUT_S)),
            "claw.asgi:application",
        ]
    if kind == "uvicorn":
        return [
            *(str(bindir / "uvicorn"), "claw.asgi:application", "--ws", "websockets"),
            *("--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"),
            *("--log-level", "warning", "--backlog", "2048", "--ws-max-size", limit),
        ]
    if kind == "echo":
        return [sys.executable, "-m", "tests.bench.sockets", "--role", "echo", str(port)]
    raise ValueError(kind)


def profiler(args, pid: int, out: Path, seconds: float):
    """py-spy recording the server (wall clock: idle threads included) while a phase runs."""
    if not args.profile:
        return None
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        log("--profile needs py-spy (pip install py-spy); not profiling")
        return None
    command = [str(spy), "record", "--pid", str(pid)]
    command += ["--duration", str(max(1, int(seconds))), "--rate", "50", "--idle"]
    command += ["--threads", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


WHERE = [  # (label, substring of a frame): the first match from the leaf up names a sample
    ("waiting for PostgreSQL", "psycopg/"),
    ("waiting for Redis", "redis/"),
    ("channels_redis", "channels_redis/"),
    ("idle: waiting for work", "thread.py"),
    ("idle: event loop select", "selectors.py"),
    ("Django ORM", "django/db/"),
    ("pydantic", "pydantic"),
    ("json", "json/"),
    ("asgiref sync/async hops", "asgiref/"),
    ("Twisted/autobahn", "twisted/"),
    ("Twisted/autobahn", "autobahn/"),
    ("websockets", "websockets/"),
    ("uvicorn", "uvicorn/"),
    ("Claw code", "/apps/"),
    ("Claw code", "/claw/"),
]


def summarize_profile(path: Path, pid: int) -> str:
    """Per thread: what its samples were doing (first matching frame from the leaf up)."""
    if not path.exists():
        return "    (no profile written: is py-spy allowed to ptrace?)"
    per_thread: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        label = "other"
        for frame in reversed(frames[1:]):
            hit = next((name for name, needle in WHERE if needle in frame), None)
            if hit:
                label = hit
                break
        per_thread.setdefault(thread, Counter())[label] += int(count)
    lines = []
    for thread, counts in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        top = ", ".join(f"{name} {n / total:.0%}" for name, n in counts.most_common(6))
        lines.append(f"    {thread} ({total} samples): {top}")
    return "\n".join(lines)


def server_nofile(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return "/".join(line.split()[3:5])
    return "?"


def bench_server(kind: str, args, env: dict, workdir: Path) -> dict:
    from tests.live import free_port, running, wait_listening

    claw = kind != "echo"
    setup = create_fleet(kind, args.agents, args.progress_agents) if claw else None
    idle = setup.idle_tokens if claw else [f"echo{i}" for i in range(args.agents)]
    busy = setup.busy_tokens if claw else [f"echo{i}" for i in range(args.progress_agents)]
    port = free_port()
    row: dict = {"server": kind}
    with running(kind, server_command(kind, port), env) as proc:
        wait_listening(port, 60, proc)
        time.sleep(0.5)
        sampler = Sampler(proc.popen.pid, env["CLAW_DATABASE_URL"] if claw else None)
        sampler.start()
        try:
            row["server_nofile"] = server_nofile(proc.popen.pid)
            row["rss_idle_mb"] = sampler.rss_kb() / 1024
            base = {
                "url": f"ws://127.0.0.1:{port}/ws/agent/",
                "open_timeout": 120,
                "ack_timeout": 30,
                "no_compression": args.no_compression,
                "connect_concurrency": args.connect_concurrency,
                "ramp_timeout": args.ramp_timeout,
            }
            log(f"{kind}: (a) {args.agents} agents for {args.duration}s")
            sampler.marker = workdir / f"{kind}-ramped"
            spy = profiler(args, proc.popen.pid, workdir / f"{kind}-a.txt", args.duration)
            cpu = sampler.thread_cpu()
            started = time.monotonic()
            a = run_client_phase(
                {
                    **base,
                    "phase": "connections",
                    "tokens": idle,
                    "duration": args.duration,
                    "heartbeat_interval": args.heartbeat_interval,
                    "marker": str(sampler.marker),
                    "hard_timeout": args.ramp_timeout + args.duration + 120,
                },
                workdir,
                timeout=args.ramp_timeout + args.duration + 180,
            )
            row["a"] = a
            now, cpu_now = time.monotonic(), sampler.thread_cpu()
            row["a_cpu"] = busiest_threads(cpu, cpu_now, now - started)
            if sampler.marked and a["hold_acks"]:
                held_cpu = sum(cpu_now.values()) - sampler.marked[1]
                row["hold_cpu"] = held_cpu / (now - sampler.marked[0])
                row["cpu_per_heartbeat_ms"] = 1000 * held_cpu / a["hold_acks"]
            row["rss_peak_mb"] = sampler.peak_kb / 1024
            row["a_db"] = sampler.db_summary()
            if spy is not None:
                spy.wait(60)
                row["a_profile"] = summarize_profile(workdir / f"{kind}-a.txt", proc.popen.pid)
            if claw:
                row["drain_s"], row["never_disconnected"] = wait_disconnected(
                    setup.group_id, args.ramp_timeout
                )
            sampler.reset()
            log(f"{kind}: (b) {args.progress_agents} agents sending progress")
            spy = profiler(args, proc.popen.pid, workdir / f"{kind}-b.txt", args.progress_duration)
            cpu = sampler.thread_cpu()
            started = time.monotonic()
            b = run_client_phase(
                {
                    **base,
                    "phase": "progress",
                    "tokens": busy,
                    "duration": args.progress_duration,
                    "progress_rate": args.progress_rate,
                    "progress_bytes": args.progress_bytes,
                    "hard_timeout": args.ramp_timeout + args.progress_duration + 120,
                },
                workdir,
                timeout=args.ramp_timeout + args.progress_duration + 180,
            )
            row["b"] = b
            cpu_now = sampler.thread_cpu()
            row["b_cpu"] = busiest_threads(cpu, cpu_now, time.monotonic() - started)
            used = sum(cpu_now.values()) - sum(cpu.values())
            row["cpu_per_progress_ms"] = 1000 * used / b["acks"] if b["acks"] else float("nan")
            row["b_db"] = sampler.db_summary()
            if spy is not None:
                spy.wait(60)
                row["b_profile"] = summarize_profile(workdir / f"{kind}-b.txt", proc.popen.pid)
        finally:
            sampler.stop()
        errors = [line for line in proc.lines if "Traceback" in line or " ERROR " in line]
        row["server_errors"] = len(errors)
        row["killed"] = sum("took too long to shut down" in line for line in proc.lines)
        (workdir / f"{kind}.log").write_text("\n".join(proc.lines))
        if errors:
            first = "\n".join(errors[:5])
            where = workdir / f"{kind}.log"
            log(f"{kind}: server logged {len(errors)} errors (all in {where}):\n{first}")
    if claw:
        from apps.devices.models import AgentMessage
        from apps.events.models import Event

        row["persisted"] = Event.objects.filter(
            group_id=setup.group_id, kind__startswith="progress."
        ).count()
        row["stored_answers"] = AgentMessage.objects.filter(agent__group_id=setup.group_id).count()
    return row


def check_targets(row: dict, args) -> list[str]:
    a, b = row["a"], row["b"]
    closes = sum(a["unexpected_closes"].values()) + args.agents - a["connected"]
    return [
        f"agents {a['connected']}/{TARGETS['agents']}"
        + (" ok" if a["connected"] >= TARGETS["agents"] else " MISS"),
        f"RSS {row['rss_peak_mb']:.0f} MB"
        + (" ok" if row["rss_peak_mb"] <= TARGETS["rss_mb"] else " MISS"),
        f"agents lost (never connected or closed by the server) {closes}"
        + (" ok" if closes == 0 else " MISS"),
        f"progress {b['acks'] / b['seconds']:.0f}/s"
        + (" ok" if b["acks"] / b["seconds"] >= TARGETS["progress_per_s"] else " MISS"),
        f"p99 {ms(b['p99'])} ms" + (" ok" if b["p99"] * 1000 <= TARGETS["p99_ms"] else " MISS"),
    ]


def print_table(rows: list[dict], args) -> None:
    head = (
        f"{'server':8} {'agents':>11} {'conn/s':>7} {'rss idle':>8} {'rss peak':>8} "
        f"{'lost':>6} {'hb p50/p99 ms':>13} | {'progress/s':>10} {'p50':>5} {'p95':>5} "
        f"{'p99':>5} {'persisted':>9}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        a, b = row["a"], row["b"]
        closes = sum(a["unexpected_closes"].values()) + args.agents - a["connected"]
        rate = a["ramp_connected"] / a["ramp_seconds"] if a["ramp_seconds"] else 0
        persisted = row.get("persisted", "-")
        print(
            f"{row['server']:8} {a['connected']:>5}/{args.agents:<5} {rate:>7.0f} "
            f"{row['rss_idle_mb']:>5.0f} MB {row['rss_peak_mb']:>5.0f} MB {closes:>6} "
            f"{ms(a['p50']) + '/' + ms(a['p99']):>13} | {b['acks'] / b['seconds']:>10.0f} "
            f"{ms(b['p50']):>5} {ms(b['p95']):>5} {ms(b['p99']):>5} {persisted!s:>9}"
        )
    echo = next((r for r in rows if r["server"] == "echo"), None)
    for row in rows:
        a, b = row["a"], row["b"]
        print(
            f"{row['server']}: ramp {a['ramp_seconds']:.1f}s, connect p50/p99 "
            f"{ms(a['connect_p50'])}/{ms(a['connect_p99'])} ms, heartbeats acked {a['acks']} "
            f"(timeouts {a['timeouts']}, errors {a['errors'] or 0}), closes "
            f"{a['unexpected_closes'] or 0}, connect failures {a['connect_failures'] or 0}, "
            f"extensions {a['extensions']}, nofile server {row['server_nofile']} client "
            f"{'/'.join(map(str, a['client_nofile']))}"
        )
        print(
            f"  progress: {b['acks']} acks in {b['seconds']:.1f}s from {b['connected']} agents, "
            f"errors {b['errors'] or 0}, timeouts {b['timeouts']}, mean {ms(b['mean'])} ms"
            + (
                f"; stored events {row['persisted']}, stored answers {row['stored_answers']}"
                if "persisted" in row
                else ""
            )
        )
        print(f"  server CPU (a) {row['a_cpu']}; (b) {row['b_cpu']}")
        if "cpu_per_heartbeat_ms" in row:
            print(
                f"  server CPU while holding: {row['hold_cpu']:.0%} of a core for "
                f"{a['hold_acks'] / a['seconds']:.0f} heartbeats/s = "
                f"{row['cpu_per_heartbeat_ms']:.2f} ms per heartbeat; "
                f"{row['cpu_per_progress_ms']:.2f} ms per progress frame"
            )
        if row["killed"]:
            print(f"  server killed {row['killed']} consumers that took too long to shut down")
        if "drain_s" in row:
            print(
                f"  database: (a) {row['a_db']}; (b) {row['b_db']}\n"
                f"  disconnects recorded within {row['drain_s']:.1f}s of the clients leaving,"
                f" {row['never_disconnected']} never recorded"
            )
        for phase in ("a", "b"):
            if f"{phase}_profile" in row:
                print(f"  py-spy ({phase}), share of samples per thread:")
                print(row[f"{phase}_profile"])
        if row["server"] != "echo":
            print("  targets: " + "; ".join(check_targets(row, args)))
            if echo:
                t = (b["acks"] / b["seconds"]) / (echo["b"]["acks"] / echo["b"]["seconds"])
                p = b["p99"] / echo["b"]["p99"]
                r = row["rss_peak_mb"] / echo["rss_peak_mb"]
                print(f"  vs echo: throughput {t:.2f}x, p99 {p:.1f}x, peak RSS {r:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=["bench", "client", "echo"], default="bench")
    parser.add_argument("target", nargs="?", help=argparse.SUPPRESS)  # client config, echo port
    parser.add_argument("--agents", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=60, help="hold after the ramp (s)")
    parser.add_argument("--heartbeat-interval", type=float, default=10)
    parser.add_argument("--progress-agents", type=int, default=50)
    parser.add_argument("--progress-duration", type=float, default=20)
    parser.add_argument(
        "--progress-rate", type=float, default=30, help="frames/s per agent (limit is 50)"
    )
    parser.add_argument("--progress-bytes", type=int, default=200, help="data.line length")
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--ramp-timeout", type=float, default=300)
    parser.add_argument("--servers", default="daphne,uvicorn")
    parser.add_argument("--no-echo", action="store_true")
    parser.add_argument("--no-compression", action="store_true", help="no permessage-deflate")
    parser.add_argument(
        "--database-url",
        default=f"postgresql://postgres@127.0.0.1:5432/claw_bench_sockets_{os.getpid()}",
        help="created afresh and dropped at the end",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the server per phase")
    args = parser.parse_args()
    if args.role == "client":
        run_client(args.target)
        return
    if args.role == "echo":
        run_echo(int(args.target))
        return

    from tests.live import child_env

    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")  # so that every finally runs

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # even when started in the background (SIG_IGN)
    limits = raise_open_files()
    prefix = f"bench-sockets-{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="claw-bench-sockets-"))
    claw_env = {
        "CLAW_DATABASE_URL": args.database_url,
        "CLAW_REDIS_URL": args.redis_url,
        "CLAW_CHANNEL_PREFIX": prefix,
        "CLAW_CELERY_QUEUE": prefix,
        "CLAW_DATA_DIR": str(workdir / "data"),
        "CLAW_DEBUG": "0",
        "CLAW_LOG_LEVEL": "WARNING",
    }
    for key in [k for k in os.environ if k.startswith("CLAW_")]:
        del os.environ[key]
    os.environ.update(claw_env, DJANGO_SETTINGS_MODULE="claw.settings")
    env = child_env(**claw_env, DJANGO_SETTINGS_MODULE="claw.settings")
    log(f"open files: soft/hard {limits[0]}/{limits[1]}; work dir {workdir}")
    rows = []
    try:
        with bench_database(args.database_url, args.keep_database):
            kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
            for kind in kinds + ([] if args.no_echo else ["echo"]):
                rows.append(bench_server(kind, args, env, workdir))
    finally:
        with contextlib.suppress(Exception):
            forget_redis_keys(args.redis_url, prefix)
    print()
    print(
        f"agents={args.agents} duration={args.duration:g}s heartbeat={args.heartbeat_interval:g}s"
        f" | progress agents={args.progress_agents} x {args.progress_rate:g}/s for "
        f"{args.progress_duration:g}s, {args.progress_bytes} B lines"
    )
    print_table(rows, args)
    broken = [
        f"{r['server']}: {r['persisted']} progress events stored for {r['b']['acks']} acks"
        for r in rows
        if "persisted" in r and r["persisted"] != r["b"]["acks"]
    ]
    broken += [f"{r['server']}: the server logged errors" for r in rows if r["server_errors"]]
    for problem in broken:
        print("ANOMALY", problem)
    if broken:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
