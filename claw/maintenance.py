"""The platform's maintenance, run by whichever process holds the maintenance lease.

Failure detection (the silent-agent and expired-lease sweeps), the matching safety net and
checkpoint expiry must go on while any one process is down, beat included. Every Celery
worker (and the embedded server) runs a `Maintainer` thread: each second it takes or renews
the `maintenance` lease (apps.events.services.leader_elect, a compare-and-set on one row)
and, while it holds it, runs the jobs that are due. The holder renews before each job; when
it dies its lease lapses after LEASE_TTL and the next contender's tick takes over, so a
kill -9 of the leader costs at most LEASE_TTL + TICK_S of maintenance.

Beat's schedule still sends the same jobs (claw.celery): each task takes the lease under its
own name first, so it runs only when no maintainer holds it (a deployment with beat and
no maintainers), and normally exactly one process does the work. The jobs are idempotent
compare-and-sets anyway: a leader that overruns its lease and a successor overlapping it
change nothing twice.
"""

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from django.db import close_old_connections, connection

from apps.events.services import leader_elect, leader_resign

logger = logging.getLogger(__name__)

LEASE = "maintenance"
LEASE_TTL = timedelta(seconds=5)
TICK_S = 1.0

_token = uuid.uuid4().hex[:8]


def holder_name(role: str = "maintainer") -> str:
    """host:pid:token:role; the pid tells a forked child from its parent."""
    return f"{socket.gethostname()}:{os.getpid()}:{_token}:{role}"


def maintenance_lead(holder: str) -> bool:
    return leader_elect(name=LEASE, holder=holder, ttl=LEASE_TTL)


def sweep_failures() -> int:
    """Silent agents first (their attempts go at once), then expired leases."""
    from apps.tasks.failover import agents_sweep_silent, attempts_sweep_expired
    from claw.metrics import SWEEP_SECONDS

    with SWEEP_SECONDS.time():
        return agents_sweep_silent() + attempts_sweep_expired()


def match_everything() -> int:
    """The matching safety net: match every group that has ready tasks."""
    from apps.tasks.matching import groups_with_ready_tasks, tasks_match

    return sum(len(tasks_match(group_id=group_id)) for group_id in groups_with_ready_tasks())


def sweep_checkpoints() -> int:
    from apps.checkpoints.services import checkpoints_sweep_expired

    return checkpoints_sweep_expired()


# (every how many seconds, job)
JOBS: list[tuple[float, Callable[[], int]]] = [
    (1.0, sweep_failures),
    (2.0, match_everything),
    (5.0, sweep_checkpoints),
]


class Maintainer(threading.Thread):
    """Contends for the maintenance lease every TICK_S and runs the due jobs while it
    holds it. stop() gives the lease up, so a clean shutdown hands over at once."""

    def __init__(self) -> None:
        super().__init__(name="claw-maintenance", daemon=True)
        self.holder = holder_name()
        self.stopped = threading.Event()
        self.leading = False
        self.last_run: dict[Callable, float] = {}

    def run(self) -> None:
        while not self.stopped.wait(TICK_S):
            try:
                close_old_connections()
                self.tick()
            except Exception:
                logger.exception("maintenance tick failed")
                connection.close()
        try:
            if leader_resign(name=LEASE, holder=self.holder):
                logger.info("%s gave up the maintenance lease", self.holder)
        except Exception:
            logger.warning("could not give up the maintenance lease", exc_info=True)
        finally:
            connection.close()

    def tick(self) -> None:
        if not self.lead():
            return
        for every, job in JOBS:
            now = time.monotonic()
            if now - self.last_run.get(job, float("-inf")) < every:
                continue
            # Renewed before each job: a slow job must not run on a lease that lapsed.
            if not self.lead():
                return
            self.last_run[job] = now
            job()

    def lead(self) -> bool:
        leading = maintenance_lead(self.holder)
        if leading != self.leading:
            logger.info("%s %s the maintenance lease", self.holder, "took" if leading else "lost")
        self.leading = leading
        return leading

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout)


_maintainer: Maintainer | None = None


def maintainer_start() -> Maintainer:
    """Start this process's maintainer (once)."""
    global _maintainer
    if _maintainer is None or not _maintainer.is_alive():
        _maintainer = Maintainer()
        _maintainer.start()
    return _maintainer


def maintainer_stop() -> None:
    global _maintainer
    if _maintainer is not None:
        _maintainer.stop()
        _maintainer = None
