"""The gateway benchmark (tests/bench/gateway.py) runs end to end at toy size: the backend,
Daphne and Uvicorn with the gateway and the client start, stream both ways, meter, and stop."""

import subprocess

import pytest

from tests.live import PYTHON, ROOT, child_env, services_database_url, services_redis_url

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def test_the_gateway_benchmark_runs_small_and_prints_its_table():
    env = child_env(
        CLAW_TEST_DATABASE_URL=services_database_url(), CLAW_TEST_REDIS_URL=services_redis_url()
    )
    command = [PYTHON, "-m", "tests.bench.gateway", "--streams", "3", "--rounds", "1"]
    command += ["--phases", "1", "--chunks", "4", "--chunk-delay-ms", "5"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    table = [line.split() for line in result.stdout.splitlines()]
    rows = {cells[0]: cells for cells in table if len(cells) > 1 and "/" in cells[1]}
    assert rows["direct"][1] == rows["daphne"][1] == rows["uvicorn"][1] == "3/3", output
    assert "daphne: ttft p50 - direct" in result.stdout
    assert "uvicorn: ttft p50 - direct" in result.stdout
    assert "metered: 22 ok of 22 calls stored, 22 made" in result.stdout, output
    assert "ANOMALY" not in result.stdout
