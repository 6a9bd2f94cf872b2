"""The socket benchmark (tests/bench/sockets.py) runs end to end at toy size: Daphne, Uvicorn
and the echo baseline each start, take agents and progress frames, and stop."""

import os
import subprocess
import urllib.parse

import pytest

from tests.live import PYTHON, ROOT, child_env, services_database_url, services_redis_url

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def test_the_socket_benchmark_runs_small_and_prints_its_table():
    base = urllib.parse.urlparse(services_database_url())
    database = urllib.parse.urlunparse(base._replace(path=f"/claw_bench_smoke_{os.getpid()}"))
    command = [PYTHON, "-m", "tests.bench.sockets", "--agents", "20", "--duration", "1"]
    command += ["--heartbeat-interval", "1", "--progress-agents", "4", "--progress-duration", "1"]
    command += ["--database-url", database, "--redis-url", services_redis_url()]
    result = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=110
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("server") and "progress/s" in line for line in lines), output
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1]}
    for server in ("daphne", "uvicorn", "echo"):
        assert rows[server][1] == "20/20", rows[server]  # every agent connected
    assert "ANOMALY" not in result.stdout
