"""The model gateway under concurrent streams, against the same backend called directly.

One run, services mode (PostgreSQL + Redis): a fresh database with a group and a paired
device, tests/llm_server as the backend (its own process, every answer streamed in
--chunks pieces --chunk-delay-ms apart), and Claw with that backend configured, served by
Daphne (`python -m claw.web`, as deployed) and by Uvicorn (--servers; the same claw.asgi
application). The client (this process, a lean asyncio HTTP/1.1 client) keeps --streams
streams open at once, each worker making --rounds calls back to back, their starts spread
over one stream's length (or, with --burst, all together each round); it alternates
direct and gateway phases so all see the same machine, and reports per path:
  * time to first token (request sent -> first content piece received), p50 / p95;
  * streamed throughput: content pieces per second per stream (request to last piece).
Targets: gateway TTFT p50 <= direct + 2 ms; throughput ratio >= 0.9. Per server it also
prints the server's CPU time per relayed piece, the figure least moved by a noisy machine.
Every call through the gateway is metered; the run checks the ModelCall rows at the end.

    python -m tests.bench.gateway                       # 50 streams x 4 calls x 2 phases
    python -m tests.bench.gateway --burst               # 50 calls at once, 4 times
    python -m tests.bench.gateway --streams 5 --rounds 1 --phases 1     # smoke size

--db-delay-ms puts a proxy delaying every byte that much each way between the gateways
and PostgreSQL: a database on another host, as in most deployments.

Before/after a change, in one run: `git worktree add /tmp/base <commit>`, then
`--baseline /tmp/base` adds a Daphne serving that checkout's code (on this checkout's
database schema) as the gateway "baseline", measured in the same alternation.
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.common import percentile
from tests.live import (
    PYTHON,
    child_env,
    dedicated_services,
    free_port,
    manage,
    running,
    wait_listening,
)
from tests.llm_server import LLMServer

TARGET_TTFT_EXTRA_MS = 2.0
TARGET_THROUGHPUT_RATIO = 0.9

SETUP = """
import json
from django.utils import timezone
from apps.devices.models import Device
from apps.groups.models import Group
from claw.tokens import new_token, token_hash
group = Group.objects.create(name="Bench", slug="bench")
raw = new_token("clawd")
Device.objects.create(group=group, name="bench", kind="cloud", token_hash=token_hash(raw),
                      token_prefix=raw[:12], paired_at=timezone.now())
print(json.dumps({"token": raw}))
"""

COUNT_CALLS = """
from apps.llm.models import ModelCall
print(ModelCall.objects.filter(status="ok").count(), ModelCall.objects.count())
"""


@dataclass
class Results:
    ttft: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Connection:
    """A minimal keep-alive HTTP/1.1 client for the load: httpx spent more CPU per piece
    than the gateway did, and on a 2-core machine the client's own lag hid the gateway's."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parsed.hostname, parsed.port, parsed.path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream(self, body: bytes, token: str, results: Results) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        started = time.perf_counter()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if b" 200 " not in status_line or headers.get("transfer-encoding") != "chunked":
            results.errors.append(f"{status_line!r} {headers}")
            await self.close()
            return
        first = last = None
        pieces = 0
        buffer = b""
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            buffer += (await self.reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if b'"content": "' in event and b'"content": ""' not in event:
                    last = time.perf_counter()
                    first = first or last
                    pieces += 1
        await self.reader.readline()  # the empty trailer
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if first is None:
            results.errors.append("no content")
            return
        results.ttft.append(first - started)
        # Whole-stream rate (request sent -> last piece): pieces that arrive late and
        # bunched do not look fast.
        results.rates.append(pieces / (last - started))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


BODY = json.dumps(
    {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "go"}], "stream": True}
).encode()


async def worker(url: str, token: str, calls: int, delay: float, results: Results) -> None:
    await asyncio.sleep(delay)
    connection = Connection(url)
    try:
        for _ in range(calls):
            try:
                await connection.stream(BODY, token, results)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                results.errors.append(f"{type(exc).__name__}: {exc}")
                await connection.close()
    finally:
        await connection.close()


async def phase(url: str, token: str, args: argparse.Namespace, results: Results) -> None:
    """--streams workers, each making --rounds calls back to back: --streams streams are
    open at once all through. Steady (default): the workers start spread over one
    stream's length, so calls begin at a steady rate, as agents' calls do. --burst: all
    start together each round, the harshest case for time to first token."""
    if args.burst:
        for _ in range(args.rounds):
            await asyncio.gather(*(worker(url, token, 1, 0, results) for _ in range(args.streams)))
        return
    span = args.chunks * args.chunk_delay_ms / 1000
    await asyncio.gather(
        *(
            worker(url, token, args.rounds, span * i / args.streams, results)
            for i in range(args.streams)
        )
    )


async def warm(url: str, token: str) -> None:
    await asyncio.gather(*(worker(url, token, 2, 0, Results()) for _ in range(4)))


def row(name: str, results: Results, count: int) -> str:
    ttft = [t * 1000 for t in results.ttft]
    rate = statistics.fmean(results.rates) if results.rates else float("nan")
    return (
        f"{name:<8} {len(results.ttft):>4}/{count:<5} {percentile(ttft, 50):>9.1f} "
        f"{percentile(ttft, 95):>9.1f} {rate:>14.1f} {len(results.errors):>7}"
    )


SERVERS = {
    "daphne": lambda port: [PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port)],
    "uvicorn": lambda port: [
        *(PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)),
        *("--lifespan", "off", "--log-level", "warning"),
    ],
}


def baseline_server(checkout: str):
    """`python -m claw.web` from another checkout (its code first on sys.path)."""
    start = f"import sys; sys.path.insert(0, {checkout!r}); from claw.web import main; main()"
    return lambda port: [PYTHON, "-c", start, "-b", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def delayed(database_url: str, delay_ms: float):
    """The database URL through tests.bench.delay_proxy."""
    parsed = urllib.parse.urlsplit(database_url)
    port = free_port()
    command = [PYTHON, "-m", "tests.bench.delay_proxy", "--listen", str(port)]
    command += ["--to", f"{parsed.hostname}:{parsed.port or 5432}", "--delay-ms", str(delay_ms)]
    with running("db-delay", command, child_env()) as proxy:
        wait_listening(port, 10, proxy)
        netloc = parsed.netloc.rsplit("@", 1)[0] + "@" if "@" in parsed.netloc else ""
        yield urllib.parse.urlunsplit(parsed._replace(netloc=f"{netloc}127.0.0.1:{port}"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="claw-bench-gateway-"))
    backend = LLMServer()
    try:
        with dedicated_services("bench_gateway", tmp) as services, contextlib.ExitStack() as stack:
            token = json.loads(manage(services, "shell", "-v", "0", "-c", SETUP))["token"]
            database_url = services["CLAW_DATABASE_URL"]
            if args.db_delay_ms:
                database_url = stack.enter_context(delayed(database_url, args.db_delay_ms))
            env = child_env(
                DJANGO_SETTINGS_MODULE="claw.settings",
                CLAW_DEBUG="0",
                CLAW_LLM_BASE_URL=backend.base_url,
                CLAW_LLM_API_KEY="bench",
                **{**services, "CLAW_DATABASE_URL": database_url},
            )
            servers = {name: SERVERS[name] for name in args.servers.split(",")}
            if args.baseline:
                servers["baseline"] = baseline_server(str(Path(args.baseline).resolve()))
            gateways = {}
            for name, server in servers.items():
                port = free_port()
                command = [*server(port), "claw.asgi:application"]
                proc = stack.enter_context(running(name, command, env))
                wait_listening(port, 30, proc)
                gateways[name] = (f"http://127.0.0.1:{port}/v1", proc.popen.pid)
            return measure(args, backend, gateways, token, services)
    finally:
        backend.close()


def measure(args, backend: LLMServer, gateways: dict, token: str, services: dict) -> int:
    answer = {
        "content": " ".join(f"w{i}" for i in range(args.chunks)),
        "chunks": args.chunks,
        "chunk_delay_ms": args.chunk_delay_ms,
    }
    paths = {"direct": f"{backend.base_url}/chat/completions"}
    paths |= {name: f"{url}/chat/completions" for name, (url, _) in gateways.items()}
    results = {name: Results() for name in paths}
    cpu = dict.fromkeys(gateways, 0.0)
    per_phase = args.streams * args.rounds
    backend.script(*[answer] * (8 * len(paths)))
    for url in paths.values():
        asyncio.run(warm(url, token))
    backend.reset()
    idle = {name: cpu_seconds(pid) for name, (_, pid) in gateways.items()}
    time.sleep(3)
    idle = {name: (cpu_seconds(gateways[name][1]) - idle[name]) / 3 for name in gateways}
    print("idle CPU " + ", ".join(f"{name} {share:.1%}" for name, share in idle.items()))
    for _ in range(args.phases):
        for name, url in paths.items():
            backend.script(*[answer] * per_phase)
            before = cpu_seconds(gateways[name][1]) if name in gateways else 0.0
            asyncio.run(phase(url, token, args, results[name]))
            if name in gateways:
                cpu[name] += cpu_seconds(gateways[name][1]) - before
    total = per_phase * args.phases
    print(
        f"{args.streams} concurrent streams x {args.rounds} calls each x {args.phases} phases, "
        f"{'all starting together each round' if args.burst else 'starting spread out'}; "
        f"{args.chunks} pieces {args.chunk_delay_ms} ms apart"
    )
    print(
        f"{'path':<8} {'streams':>10} {'ttft_p50':>9} {'ttft_p95':>9} {'pieces/s/stream':>14} "
        f"{'errors':>7}"
    )
    for name in paths:
        print(row(name, results[name], total))
    direct = results["direct"]
    for name in gateways:
        through = results[name]
        extra = percentile(through.ttft, 50) * 1000 - percentile(direct.ttft, 50) * 1000
        ratio = (
            statistics.fmean(through.rates) / statistics.fmean(direct.rates)
            if through.rates and direct.rates
            else float("nan")
        )
        ttft_ok = "ok" if extra <= TARGET_TTFT_EXTRA_MS else "MISSED"
        rate_ok = "ok" if ratio >= TARGET_THROUGHPUT_RATIO else "MISSED"
        per_piece = 1e6 * cpu[name] / max(1, total * args.chunks)
        print(
            f"{name}: ttft p50 - direct {extra:+.1f} ms (target <= {TARGET_TTFT_EXTRA_MS:.0f}: "
            f"{ttft_ok}); throughput ratio {ratio:.3f} (target >= {TARGET_THROUGHPUT_RATIO}: "
            f"{rate_ok}); server CPU {cpu[name]:.1f} s = {per_piece:.0f} us per relayed piece"
        )
    deadline = time.monotonic() + 30
    expected = total * len(gateways) + 8 * len(gateways)  # + the warm-up calls
    while True:
        ok, stored = map(int, manage(services, "shell", "-v", "0", "-c", COUNT_CALLS).split())
        if stored >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"metered: {ok} ok of {stored} calls stored, {expected} made")
    anomalies = [error for result in results.values() for error in result.errors]
    if stored != expected:
        anomalies.append(f"metered {stored} calls, not {expected}")
    for anomaly in anomalies[:10]:
        print(f"ANOMALY {anomaly}")
    return 1 if anomalies else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--phases", type=int, default=2, help="direct+gateway alternations")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-delay-ms", type=int, default=20)
    parser.add_argument(
        "--burst", action="store_true", help="all streams start together, each round"
    )
    parser.add_argument("--db-delay-ms", type=float, default=0.0)
    parser.add_argument("--baseline", help="another checkout, served by Daphne as 'baseline'")
    parser.add_argument("--servers", default="daphne,uvicorn", help="gateway servers to measure")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
