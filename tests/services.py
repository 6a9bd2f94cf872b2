"""Which real services the test run uses.

CLAW_TEST_SERVICES=require (CI): PostgreSQL and Redis must answer, or the run fails.
CLAW_TEST_SERVICES=auto (default): use them when they answer, else SQLite + in-memory layer,
and tests marked `postgres`/`redis` are skipped with the reason.
CLAW_TEST_SERVICES=off: never use them.
"""

import os
from urllib.parse import urlparse

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/claw"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def postgres_answers(url: str) -> str | None:
    try:
        import psycopg

        # Connect to the maintenance database: the test database may not exist yet.
        parsed = urlparse(url)
        psycopg.connect(
            host=parsed.hostname,
            port=parsed.port or 5432,
            user=parsed.username or "",
            password=parsed.password or "",
            dbname="postgres",
            connect_timeout=2,
        ).close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()


def redis_answers(url: str) -> str | None:
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()


def configure() -> dict[str, str]:
    """Set CLAW_DATABASE_URL / CLAW_REDIS_URL for this run; return skip reasons."""
    mode = os.environ.get("CLAW_TEST_SERVICES", "auto")
    if mode not in {"require", "auto", "off"}:
        raise RuntimeError(f"CLAW_TEST_SERVICES must be require, auto or off, not {mode!r}")
    database_url = os.environ.get("CLAW_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    redis_url = os.environ.get("CLAW_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    skips: dict[str, str] = {}
    if mode == "off":
        return {
            "postgres": "CLAW_TEST_SERVICES=off",
            "redis": "CLAW_TEST_SERVICES=off",
        }
    for name, url, probe, env in (
        ("postgres", database_url, postgres_answers, "CLAW_DATABASE_URL"),
        ("redis", redis_url, redis_answers, "CLAW_REDIS_URL"),
    ):
        problem = probe(url)
        if problem is None:
            os.environ[env] = url
        elif mode == "require":
            raise RuntimeError(
                f"CLAW_TEST_SERVICES=require but {name} at {url} does not answer: {problem}"
            )
        else:
            skips[name] = f"{name} not reachable at {url} ({problem[:120]})"
    return skips
