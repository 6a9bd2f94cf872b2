"""The gateway benchmark (tests/bench/gateway.py) runs end to end at toy size: the backend,
the gateway servers and the client start, stream both ways, meter, and stop."""

import subprocess

import pytest

from tests.live import PYTHON, ROOT, child_env, services_database_url, services_redis_url

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def run_small(*extra: str) -> tuple[dict, str]:
    env = child_env(
        CLAW_TEST_DATABASE_URL=services_database_url(), CLAW_TEST_REDIS_URL=services_redis_url()
    )
    command = [PYTHON, "-m", "tests.bench.gateway", "--streams", "3", "--rounds", "1"]
    command += ["--phases", "1", "--chunks", "4", "--chunk-delay-ms", "5", *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "ANOMALY" not in result.stdout
    table = [line.split() for line in result.stdout.splitlines()]
    return {cells[0]: cells for cells in table if len(cells) > 1 and "/" in cells[1]}, output


def test_the_gateway_benchmark_runs_small_and_prints_its_table():
    rows, output = run_small()

    assert rows["direct"][1] == rows["daphne"][1] == rows["uvicorn"][1] == "3/3", output
    assert "daphne: ttft p50 - direct" in output
    assert "uvicorn: ttft p50 - direct" in output
    assert "metered: 22 ok of 22 calls stored, 22 made" in output, output


def test_it_compares_with_another_checkout_behind_a_slow_database():
    rows, output = run_small("--servers", "daphne", "--baseline", str(ROOT), "--db-delay-ms", "2")

    assert rows["direct"][1] == rows["daphne"][1] == rows["baseline"][1] == "3/3", output
    assert "baseline: ttft p50 - direct" in output
    # Each call's caller lookup crosses the 2 ms-each-way proxy before the first token.
    assert float(rows["daphne"][2]) >= float(rows["direct"][2]) + 4.0, output
    assert "metered: 22 ok of 22 calls stored, 22 made" in output, output
