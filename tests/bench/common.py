"""What the benchmarks share: percentiles, progress lines, a throwaway database, and
clearing a run's Redis keys."""

import contextlib
import sys
import time
import urllib.parse


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def bench_database(url: str, keep: bool):
    """A fresh, migrated database at `url` for this run (dropped afterwards)."""
    import psycopg

    parsed = urllib.parse.urlparse(url)
    name = parsed.path.lstrip("/")
    admin = urllib.parse.urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        yield
    finally:
        from django.db import connections

        connections.close_all()
        if not keep:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def forget_redis_keys(redis_url: str, prefix: str) -> None:
    """Delete every key containing the run's prefix (channel layer, broker, cache)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def close_connections_before_fork() -> None:
    """Close this process's database connections and its connection pool before forking:
    a child must inherit no open connection. A pooled one (CLAW_DB_POOL) would otherwise
    be handed out in two processes at once, on one socket, and the two would corrupt each
    other's protocol (a race worker hung, idle in a transaction, with the parent's socket).
    Closing the pool in the child instead would say goodbye on the parent's sockets."""
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        conn.close()
        if conn.settings_dict.get("OPTIONS", {}).get("pool"):
            conn.close_pool()
