"""Prometheus metrics: what Claw counts, and GET /metrics.

Counters and histograms are recorded where things happen (the matcher, the services, the
agent socket, the sweeper, the model gateway's meter). Agents and tasks by status are read
from the database at scrape time (one GROUP BY each), so every web process reports the same
numbers and nothing is kept per process.

Services mode runs several web processes and Celery workers. With CLAW_METRICS_DIR set,
every process writes its counters to files there (prometheus_client's multiprocess mode)
and a scrape of any web process adds up the files of all of them. The directory is shared
by all of Claw's processes and emptied only where they all start together: `claw up`
(services mode) and compose's one-shot migrate (`python -m claw.metrics reset`). Without it
(embedded mode, in-process tests) the counters live in this process's default registry.

Access: with CLAW_METRICS_TOKEN set, /metrics wants `Authorization: Bearer <token>`;
without it, only a request from a loopback address that no proxy forwarded is answered.
Anyone else gets 404: they do not learn that the endpoint exists.
"""

import hmac
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

from django.utils import timezone
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Read here, not from Django settings: the choice must be made before the first metric
# exists, and Celery or a plain script may import this before settings are configured.
METRICS_DIR = os.environ.get("CLAW_METRICS_DIR", "")
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())


def _process_identifier() -> str:
    # Containers sharing one directory all run as pid 1, 7, …: the host name keeps their
    # files apart. (No "_": prometheus_client splits file names on it.)
    return f"{_HOST}-{os.getpid()}"


if METRICS_DIR:
    Path(METRICS_DIR).mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR
    values.ValueClass = values.MultiProcessValue(_process_identifier)

# Latencies from a few ms (an agent free and waiting) to minutes (a queue under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

ASSIGNMENT_SECONDS = Histogram(
    "claw_assignment_latency_seconds",
    "Ready (or its retry backoff ended) to offered by the matcher, per offer.",
    buckets=LATENCY_BUCKETS,
)
ACCEPT_SECONDS = Histogram(
    "claw_offer_accept_latency_seconds",
    "Offered to accepted by the agent, per accepted attempt.",
    buckets=LATENCY_BUCKETS,
)
REASSIGNMENTS = Counter(
    "claw_reassignments",
    "Attempts that ended and sent their task back to ready. kind: failed (the agent "
    "reported a retryable failure), lost_offered (an offer never accepted: deadline passed "
    "or agent gone), lost_running (an accepted attempt: lease expired or agent gone).",
    ["kind"],
)
AGENT_FRAMES = Counter(
    "claw_agent_frames", "Agent protocol frames received, by frame type.", ["type"]
)
SWEEP_SECONDS = Histogram(
    "claw_sweep_duration_seconds",
    "One lease sweep (silent agents, then expired leases).",
    buckets=LATENCY_BUCKETS,
)
MATCH_SECONDS = Histogram(
    "claw_match_batch_duration_seconds",
    "One matcher call (tasks_match): read agents, lock ready tasks, claim the batch.",
    buckets=LATENCY_BUCKETS,
)
MODEL_TOKENS = Counter(
    "claw_model_tokens",
    "Model tokens of agents' calls through the gateway, by kind (prompt, completion).",
    ["kind"],
)


def assignments_observe(*, ready: Iterable, attempts: Iterable) -> None:
    """The matcher's offers, once committed: ready → now, from the end of its retry
    backoff for a task that had to wait one out."""
    now = timezone.now()
    since = {task.id: max(task.ready_at, task.not_before or task.ready_at) for task in ready}
    for attempt in attempts:
        ASSIGNMENT_SECONDS.observe((now - since[attempt.task_id]).total_seconds())


class DatabaseCollector(Collector):
    """Agents and tasks by status, read when scraped. Every status is reported, zeros too,
    so a series does not vanish when its last agent or task leaves it."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from apps.devices.models import AgentStatus
        from apps.devices.selectors import agent_counts_by_status
        from apps.tasks.models import TaskStatus
        from apps.tasks.selectors import task_counts_by_status

        for name, doc, statuses, counts in (
            ("claw_agents", "Agents by status.", AgentStatus, agent_counts_by_status()),
            ("claw_tasks", "Tasks by status.", TaskStatus, task_counts_by_status()),
        ):
            family = GaugeMetricFamily(name, doc, labels=["status"])
            for status in statuses:
                family.add_metric([status.value], counts.get(status.value, 0))
            yield family


def exposition(*, with_database: bool = True) -> bytes:
    """The text a scrape gets: every process's counters (or this process's, without a
    metrics directory), then the database gauges."""
    if METRICS_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=METRICS_DIR)
        text = generate_latest(registry)
    else:
        text = generate_latest(REGISTRY)
    if with_database:
        database = CollectorRegistry()
        database.register(DatabaseCollector())
        text += generate_latest(database)
    return text


def metrics_dir_reset(path: str) -> None:
    """Empty the metrics directory; only while none of Claw's processes runs."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for file in directory.glob("*.db"):
        file.unlink(missing_ok=True)


def _allowed(request) -> bool:
    from django.conf import settings

    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
    if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
        return False  # a proxy on this host relays someone else's request
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def metrics_view(request):
    from django.http import Http404, HttpResponse

    if not _allowed(request):
        raise Http404
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


def main(argv: list[str]) -> int:
    """`python -m claw.metrics reset`: empty CLAW_METRICS_DIR before Claw's processes
    start (compose's migrate step)."""
    if argv != ["reset"]:
        print("usage: python -m claw.metrics reset", file=sys.stderr)
        return 2
    if METRICS_DIR:
        metrics_dir_reset(METRICS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
