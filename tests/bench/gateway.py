"""The model gateway under concurrent streams, against the same backend called directly.

One run, services mode (PostgreSQL + Redis): a fresh database with a group and a paired
device, tests/llm_server as the backend (its own process, every answer streamed in
--chunks pieces --chunk-delay-ms apart), and Claw with that backend configured, served by
Daphne and by Uvicorn (--servers; the same claw.asgi application). The client (asyncio +
httpx, this process) keeps --streams streams open at once for --rounds rounds, alternating
direct and gateway phases so all see the same machine, and reports per path:
  * time to first token (request sent -> first content piece received), p50 / p95;
  * streamed throughput: content pieces per second per stream (request to last piece).
Targets: gateway TTFT p50 <= direct + 2 ms; throughput ratio >= 0.9. Per server it also
prints the server's CPU time per relayed piece, the figure least moved by a noisy machine.
Every call through the gateway is metered; the run checks the ModelCall rows at the end.

    python -m tests.bench.gateway                       # 50 streams x 4 rounds x 2 phases
    python -m tests.bench.gateway --streams 5 --rounds 1 --phases 1     # smoke size
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

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


async def one_stream(client: httpx.AsyncClient, url: str, token: str, results: Results) -> None:
    body = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "go"}], "stream": True}
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    first = last = None
    pieces = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                results.errors.append(f"{response.status_code} {(await response.aread())[:200]}")
                return
            buffer = b""
            async for chunk in response.aiter_raw():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if b'"content": "' in event and b'"content": ""' not in event:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        pieces += 1
    except httpx.HTTPError as exc:
        results.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if first is None:
        results.errors.append("no content")
        return
    results.ttft.append(first - started)
    # Whole-stream rate (request sent -> last piece): pieces that arrive late and bunched
    # do not look fast.
    results.rates.append(pieces / (last - started))


async def phase(url: str, token: str, streams: int, rounds: int, results: Results) -> None:
    limits = httpx.Limits(max_connections=streams * 2, max_keepalive_connections=streams * 2)
    timeout = httpx.Timeout(60)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        for _ in range(rounds):
            await asyncio.gather(*(one_stream(client, url, token, results) for _ in range(streams)))


async def warm(url: str, token: str) -> None:
    await phase(url, token, 4, 2, Results())


def row(name: str, results: Results, count: int) -> str:
    ttft = [t * 1000 for t in results.ttft]
    rate = statistics.fmean(results.rates) if results.rates else float("nan")
    return (
        f"{name:<8} {len(results.ttft):>4}/{count:<5} {percentile(ttft, 50):>9.1f} "
        f"{percentile(ttft, 95):>9.1f} {rate:>14.1f} {len(results.errors):>7}"
    )


SERVERS = {
    "daphne": lambda port: [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)],
    "uvicorn": lambda port: [
        *(PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)),
        *("--lifespan", "off", "--log-level", "warning"),
    ],
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="claw-bench-gateway-"))
    backend = LLMServer()
    try:
        with dedicated_services("bench_gateway", tmp) as services, contextlib.ExitStack() as stack:
            token = json.loads(manage(services, "shell", "-v", "0", "-c", SETUP))["token"]
            env = child_env(
                DJANGO_SETTINGS_MODULE="claw.settings",
                CLAW_DEBUG="0",
                CLAW_LLM_BASE_URL=backend.base_url,
                CLAW_LLM_API_KEY="bench",
                **services,
            )
            gateways = {}
            for name in args.servers.split(","):
                port = free_port()
                command = [*SERVERS[name](port), "claw.asgi:application"]
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
    for _ in range(args.phases):
        for name, url in paths.items():
            backend.script(*[answer] * per_phase)
            before = cpu_seconds(gateways[name][1]) if name in gateways else 0.0
            asyncio.run(phase(url, token, args.streams, args.rounds, results[name]))
            if name in gateways:
                cpu[name] += cpu_seconds(gateways[name][1]) - before
    total = per_phase * args.phases
    print(
        f"{args.streams} concurrent streams x {args.rounds} rounds x {args.phases} phases; "
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
    parser.add_argument("--servers", default="daphne,uvicorn", help="gateway servers to measure")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
