"""Writes finished gateway calls off the request path: the views hand each CallRecord to
METER, whose one thread stores what queued up within GATHER_S of the first record as one
batch (services.model_calls_record): one transaction per group for many calls under load,
and a call stored about GATHER_S after it ends when idle. Writing each call on its own
made the meter's thread take the GIL from the event loop right as the next call started
(a few ms of time to first token). Records still queued when the process exits are
written on the way out (up to FLUSH_ON_EXIT_S)."""

import atexit
import logging
import queue
import threading
import time

from django.db import close_old_connections, connection

from apps.llm.services import CallRecord, model_calls_record
from claw.metrics import MODEL_TOKENS

logger = logging.getLogger(__name__)

BATCH_MAX = 500
GATHER_S = 0.1
FLUSH_ON_EXIT_S = 5.0


class Meter:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[CallRecord] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None

    def submit(self, record: CallRecord) -> None:
        """Queue a record; never blocks and never raises into the caller."""
        MODEL_TOKENS.labels(kind="prompt").inc(record.prompt_tokens)
        MODEL_TOKENS.labels(kind="completion").inc(record.completion_tokens)
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="claw-llm-meter", daemon=True
                )
                self._thread.start()
        self._queue.put(record)

    def flush(self, timeout: float = FLUSH_ON_EXIT_S) -> bool:
        """Wait until every submitted record is stored (or dropped); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            time.sleep(GATHER_S)
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            finally:
                with self._idle:
                    self._pending -= len(batch)
                    if self._pending == 0:
                        self._idle.notify_all()

    def _write(self, batch: list[CallRecord]) -> None:
        """Each group's records are one transaction (model_calls_record), so each group is
        retried on its own: a group that committed is never stored twice. A group that
        fails twice is stored record by record, so one bad record loses only itself."""
        by_group: dict[int, list[CallRecord]] = {}
        for record in batch:
            by_group.setdefault(record.group_id, []).append(record)
        for records in by_group.values():
            if self._store(records) or len(records) == 1:
                continue
            for record in records:
                self._store([record])

    def _store(self, records: list[CallRecord]) -> bool:
        for attempt in (1, 2):
            try:
                close_old_connections()
                model_calls_record(records=records)
                return True
            except Exception:
                logger.exception("storing %d model calls failed (try %d)", len(records), attempt)
                connection.close()
                time.sleep(0.5)
        if len(records) == 1:
            logger.error("dropped a model call record of group %s", records[0].group_id)
        return False


METER = Meter()
atexit.register(METER.flush)
