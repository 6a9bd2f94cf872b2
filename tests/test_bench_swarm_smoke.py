"""The swarm benchmark (tests/bench/swarm.py) runs end to end at toy size with its faults:
PostgreSQL, its own redis-server, two web processes behind the round-robin front, two
workers, beat, agents in driver processes (one of them killed with -9), a web process and a
worker killed and restarted; the JSON report has its fields and nothing was lost or done
twice."""

import json
import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from tests.live import PYTHON, ROOT, child_env, services_database_url

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(240)]

FIELDS = {
    "agents", "tasks", "wall_s", "tasks_per_s", "floor", "ratio", "ready_to_offered_ms",
    "complete_to_ack_ms", "offer_delivered_ms", "lost", "duplicated", "attempts_lost_healthy",
    "failed_without_agent_failing", "rss_peak_kib", "pg_peak", "faults", "plot_path",
}  # fmt: skip


def test_the_swarm_benchmark_runs_small_with_faults_and_loses_nothing(tmp_path):
    base = urllib.parse.urlparse(services_database_url())
    database = urllib.parse.urlunparse(base._replace(path=f"/claw_bench_swarm_{os.getpid()}"))
    command = [PYTHON, "-m", "tests.bench.swarm", "--agents", "6", "--tasks", "30"]
    command += ["--drivers", "2", "--floor-rows", "500", "--duration-limit", "90"]
    command += ["--heartbeat-interval", "1", "--lease-timeout", "4", "--reconnect-grace", "2"]
    command += ["--database-url", database, "--out", str(tmp_path)]
    result = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=200
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    path = re.search(r"^report: (.+)$", result.stdout, re.M).group(1)
    report = json.loads(Path(path).read_text())
    assert set(report) >= FIELDS, sorted(FIELDS - set(report))
    assert report["agents"] == 6 and report["tasks"] == 30, report
    # the graph's 30 tasks and the gate they waited behind
    assert report["tasks_by_status"] == {"succeeded": 31}, report["tasks_by_status"]
    assert report["lost"] == 0 and report["duplicated"] == 0, output[-3000:]
    assert report["complete_to_ack_ms"]["n"] >= 20, report["complete_to_ack_ms"]  # a killed
    # driver loses what it saw in its last 0.25 s
    assert report["ready_to_offered_ms"]["n"] >= 30, report["ready_to_offered_ms"]
    assert report["floor"]["per_s"] > 0 and report["ratio"] > 0, report["floor"]
    assert report["pg_peak"] > 0, report
    assert {"web1", "web2", "worker1", "worker2", "beat", "front"} <= set(report["rss_peak_kib"])
    assert report["faults"]["on"] and not report["faults"]["errors"], report["faults"]
    done = [event["what"] for event in report["faults"]["events"]]
    assert "kill -9 of the victim agents' driver" in done, done
    assert "kill -9 of web1" in done, done
    assert report["plot_path"] and os.path.exists(report["plot_path"]), report["plot_path"]
    assert "ratio tasks/s / floor" in result.stdout, output
