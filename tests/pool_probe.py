"""Run in its own process by tests/test_db_pool.py, on claw.settings as a server has them:
ORM calls from many threads at once, the way the agent sockets make them, and what they
did to the database's connections. Prints one JSON line.

    python -m tests.pool_probe burst      # 200 calls on 32 threads
    python -m tests.pool_probe starve     # one connection held; another thread wants one
"""

import asyncio
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import django

django.setup()

from channels.db import database_sync_to_async  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from claw.errors import database_unavailable, pool_timed_out  # noqa: E402

THREADS = 32
CALLS = 200


def one_call() -> tuple[int, int]:
    """(this connection's backend pid, how many connections this process has open)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid(), count(*) FROM pg_stat_activity "
            "WHERE application_name = current_setting('application_name')"
        )
        pid, open_now = cursor.fetchone()
        cursor.execute("SELECT pg_sleep(0.02)")
    return pid, open_now


async def burst() -> dict:
    # More threads than the pool has connections, as a busy server's executor would have.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(THREADS))
    call = database_sync_to_async(one_call, thread_sensitive=False)
    results = await asyncio.gather(*(call() for _ in range(CALLS)))
    _, open_after = await call()
    return {
        "calls": len(results),
        "backends": len({pid for pid, _ in results}),
        "peak_open": max(open_now for _, open_now in results),
        "open_after": open_after,
        "threads": threading.active_count(),
    }


def starve() -> dict:
    held = threading.Event()

    def hold() -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            held.set()
            cursor.execute("SELECT pg_sleep(2)")
        connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    started = time.monotonic()
    try:
        one_call()
    except Exception as exc:
        unavailable = database_unavailable(exc)
        result = {
            "error": f"{type(exc).__module__}.{type(exc).__name__}: {exc}",
            "waited_s": round(time.monotonic() - started, 2),
            "pool_timed_out": pool_timed_out(exc),
            "code": unavailable.code if unavailable else None,
        }
    else:
        result = {"error": None, "waited_s": round(time.monotonic() - started, 2)}
    holder.join()
    return result


if __name__ == "__main__":
    mode = sys.argv[1]
    result = asyncio.run(burst()) if mode == "burst" else starve()
    print(json.dumps(result), flush=True)
