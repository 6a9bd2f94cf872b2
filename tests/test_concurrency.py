"""Processes racing on real PostgreSQL: exactly one wins every race (see tests/bench)."""

import pytest

from tests.bench.concurrency import run_races

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_only_one_of_four_processes_assigns_the_same_task_over_1000_races():
    report = run_races(races=1000, workers=4, kind="assign")
    print(report.summary())
    assert report.anomalies == []
    assert report.outcomes["won"] == 1000
    assert report.outcomes["not_ready"] == 3000


def test_complete_lose_and_fail_racing_on_one_attempt_leave_one_outcome():
    report = run_races(races=300, workers=3, kind="finish")
    print(report.summary())
    assert report.anomalies == []
    assert report.outcomes["won"] == 300


@pytest.mark.parametrize(
    "kind",
    [
        # Two dependencies of one task succeed at once: it is released exactly once.
        "siblings",
        # A task is created on a dependency that succeeds meanwhile: it ends up ready.
        "create",
    ],
)
def test_readiness_races_leave_no_task_waiting_for_ever(kind):
    report = run_races(races=150, workers=2, kind=kind)
    print(report.summary())
    assert report.anomalies == []
    assert report.outcomes["won"] == 300
