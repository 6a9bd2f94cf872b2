"""Embedded mode: the whole platform in one process (`claw up` without CLAW_REDIS_URL).

Daphne serves in the main thread; a Celery worker (thread pool) and the beat scheduler run
as threads next to it. Celery's memory:// transport only connects producers and consumers
inside one process, which is why beat and the worker can't be subprocesses here.

The channel layer is in-process too. Its asyncio queues belong to the server's event loop,
so a broadcast sent from a worker thread (through async_to_sync, on a loop of its own) is
handed over to the server loop instead of touching those queues from a foreign thread.
"""

import asyncio
import logging
import socket
import threading

from channels.layers import InMemoryChannelLayer

logger = logging.getLogger(__name__)

# Beat and the worker log three INFO lines per tick; the console is the operator's.
QUIET_LOGGERS = ("celery.beat", "celery.app.trace", "celery.worker.strategy")
HANDOFF_TIMEOUT_S = 5.0


class InProcessChannelLayer(InMemoryChannelLayer):
    """InMemoryChannelLayer that runs every call on one home event loop once it is set.

    Without a home loop (tests, management commands) it is the plain in-memory layer."""

    home_loop: asyncio.AbstractEventLoop | None = None

    async def _at_home(self, method, *args):
        home = InProcessChannelLayer.home_loop
        if home is None or not home.is_running() or asyncio.get_running_loop() is home:
            return await method(*args)
        future = asyncio.run_coroutine_threadsafe(method(*args), home)
        return await asyncio.wait_for(asyncio.wrap_future(future), HANDOFF_TIMEOUT_S)

    async def send(self, channel, message):
        return await self._at_home(super().send, channel, message)

    async def receive(self, channel):
        return await self._at_home(super().receive, channel)

    async def group_add(self, group, channel):
        return await self._at_home(super().group_add, group, channel)

    async def group_discard(self, group, channel):
        return await self._at_home(super().group_discard, group, channel)

    async def group_send(self, group, message):
        return await self._at_home(super().group_send, group, message)

    async def flush(self):
        return await self._at_home(super().flush)


def set_home_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    InProcessChannelLayer.home_loop = loop


class EmbeddedCelery:
    """A Celery worker and the beat scheduler as daemon threads of this process."""

    def __init__(self, *, concurrency: int = 2, ready_timeout: float = 20.0) -> None:
        self.concurrency = concurrency
        self.ready_timeout = ready_timeout
        self.worker = None
        self.worker_thread: threading.Thread | None = None
        self.beat = None
        self.maintainer = None

    def start(self) -> None:
        from celery.app.trace import setup_worker_optimizations
        from celery.beat import EmbeddedService
        from celery.worker import WorkController

        from claw.celery import app

        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        app.finalize()
        app.set_current()
        app.set_default()
        hostname = f"embedded@{socket.gethostname()}"
        # What `celery worker` does before starting: tasks then see this worker's name.
        setup_worker_optimizations(app, hostname)
        ready = threading.Event()
        self.worker = WorkController(
            app=app,
            hostname=hostname,
            pool="threads",
            concurrency=self.concurrency,
            ready_callback=lambda consumer: ready.set(),
            # Mingle, gossip and heartbeats talk to other workers; there are none.
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
        )
        self.worker_thread = threading.Thread(
            target=self.worker.start, name="celery-worker", daemon=True
        )
        self.worker_thread.start()
        if not ready.wait(self.ready_timeout):
            raise RuntimeError(f"the embedded Celery worker did not start in {self.ready_timeout}s")
        # The plain in-memory Scheduler: the schedule is code, nothing needs persisting.
        self.beat = EmbeddedService(app, thread=True, scheduler_cls="celery.beat:Scheduler")
        self.beat.start()
        from claw.maintenance import maintainer_start

        self.maintainer = maintainer_start()
        logger.info("embedded worker %s (%d threads) and beat started", hostname, self.concurrency)

    def alive(self) -> bool:
        return bool(
            self.worker_thread
            and self.worker_thread.is_alive()
            and self.beat is not None
            and self.beat.is_alive()
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown: beat stops ticking, the worker finishes what it is running."""
        if self.maintainer is not None:
            from claw.maintenance import maintainer_stop

            maintainer_stop()
        if self.beat is not None and self.beat.is_alive():
            self.beat.service.stop()
            self.beat.join(timeout)
        if self.worker is not None:
            self.worker.stop()
        if self.worker_thread is not None:
            self.worker_thread.join(timeout)
            if self.worker_thread.is_alive():
                logger.warning("the embedded worker did not stop within %ss", timeout)
