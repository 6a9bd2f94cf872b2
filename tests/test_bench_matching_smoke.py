"""The matching benchmark (tests/bench/matching.py) runs end to end at toy size: raw and
Claw claims with their checks, complete -> assignment through Daphne and Celery, and one
trial of each failover case under a fast policy, then prints its summary."""

import os
import re
import subprocess
import urllib.parse

import pytest

from tests.live import PYTHON, ROOT, child_env, services_database_url, services_redis_url

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def test_the_matching_benchmark_runs_small_and_prints_its_summary():
    base = urllib.parse.urlparse(services_database_url())
    database = urllib.parse.urlunparse(base._replace(path=f"/claw_bench_match_{os.getpid()}"))
    command = [PYTHON, "-m", "tests.bench.matching", "--claims", "400", "--groups", "2"]
    command += ["--rounds", "2"]
    command += ["--processes", "2", "--latency-iterations", "10", "--trials", "1"]
    command += ["--clean-trials", "1", "--pause-trials", "1", "--heartbeat-interval", "1"]
    command += ["--lease-timeout", "3", "--reconnect-grace", "1"]
    command += ["--database-url", database, "--redis-url", services_redis_url()]
    result = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=100
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    lines = result.stdout.splitlines()
    rows = {m[1]: m[2] for m in re.finditer(r"^(raw|claw) +(\d+) ", result.stdout, re.M)}
    assert rows == {"raw": "400", "claw": "400"}, output  # every task claimed
    assert any(line.startswith("claw/raw: ") for line in lines), output
    assert any(line.startswith("target claims: ") for line in lines), output
    assert re.search(r"^complete -> next assignment\s+10 ", result.stdout, re.M), output
    for case in ("kill -9", "SIGSTOP for good", "clean close"):
        assert re.search(rf"^{case}.*\s1\s+\d+\.\d", result.stdout, re.M), output
    assert "kept by its agent: 1/1" in result.stdout, output
    assert "anomalies: 0" in lines, output
    assert "ANOMALY" not in result.stdout
