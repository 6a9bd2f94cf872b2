"""The database connection pool in services mode: however many threads make ORM calls,
a process holds at most CLAW_DB_POOL_MAX connections, hands each back after the call, and
a caller that cannot get one in time gets a clear error instead of waiting for ever."""

import json
import os
import subprocess
import uuid
from urllib.parse import urlparse, urlunparse

import pytest

from tests.live import PYTHON, ROOT, child_env, services_database_url

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def probe(mode: str, tmp_path, **env: str) -> dict:
    """tests/pool_probe.py in a process of its own, on the test database server, its
    connections named so that pg_stat_activity tells them apart from everyone else's."""
    app = f"claw-pool-{uuid.uuid4().hex[:8]}"
    url = urlunparse(urlparse(services_database_url())._replace(path="/postgres"))
    result = subprocess.run(
        [PYTHON, "-m", "tests.pool_probe", mode],
        env=child_env(
            DJANGO_SETTINGS_MODULE="claw.settings",
            CLAW_DATABASE_URL=f"{url}?application_name={app}",
            CLAW_DATA_DIR=str(tmp_path / "data"),
            **env,
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_many_threads_share_at_most_pool_max_connections(tmp_path):
    result = probe("burst", tmp_path, CLAW_DB_POOL_MAX="4")
    assert result["calls"] == 200
    assert result["threads"] > 4, result  # the calls really ran on more threads than that
    assert result["peak_open"] <= 4, result
    assert result["backends"] <= 4, result
    assert result["open_after"] <= 4, result


def test_the_default_pool_fits_the_deployment_under_postgresqls_default_limit(tmp_path):
    """2 web processes at the pool's maximum, and 4 Celery worker processes (2 workers at
    concurrency 2; each runs one task at a time, on one connection): at most 60 of
    PostgreSQL's default 100, leaving room for migrations, psql and a second beat."""
    from django.conf import settings

    pool = settings.DATABASES["default"]["OPTIONS"].get("pool")
    if os.environ.get("CLAW_DB_POOL_MAX") or not pool:
        pytest.skip("the run overrides the pool's size")
    assert settings.DATABASES["default"]["CONN_MAX_AGE"] == 0
    assert 2 * pool["max_size"] + 4 * max(pool["min_size"], 1) <= 60


def test_a_caller_waiting_past_the_pool_timeout_gets_database_unavailable(tmp_path):
    result = probe("starve", tmp_path, CLAW_DB_POOL_MAX="1", CLAW_DB_POOL_TIMEOUT="0.3")
    assert result["pool_timed_out"] is True, result
    assert result["code"] == "database_unavailable", result
    assert result["error"].startswith("django.db.utils.OperationalError"), result
    assert 0.25 <= result["waited_s"] < 1.5, result
