"""The bulk creation benchmark (tests/bench/graph.py) runs end to end at toy size and
prints its summary."""

import os
import re
import subprocess
import urllib.parse

import pytest

from tests.live import PYTHON, ROOT, child_env, services_database_url

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_the_graph_benchmark_runs_small_and_prints_its_summary():
    base = urllib.parse.urlparse(services_database_url())
    database = urllib.parse.urlunparse(base._replace(path=f"/claw_bench_graph_{os.getpid()}"))
    command = [PYTHON, "-m", "tests.bench.graph", "--tasks", "300", "--width", "30"]
    command += ["--single", "20", "--rounds", "1", "--database-url", database]
    result = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"^graph API \(one POST\)\s+\d+\.\d{3}", result.stdout, re.M), output
    assert re.search(r"-> \d+\.\d s for 300", result.stdout), output
    counts = re.search(r"^statements: 60 tasks: (\d+), 300 tasks: (\d+)$", result.stdout, re.M)
    assert counts and counts[1] == counts[2], output
