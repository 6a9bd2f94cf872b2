"""Races on real PostgreSQL: several processes try the same transition at the same instant.

Two kinds of race, each repeated many times:
- assign: every process offers the same ready task to its own agent (task_assign);
- finish: one running attempt is completed by its agent, declared lost by the sweeper and
  failed by a stale retry, all at once (attempt_complete / attempt_lose / attempt_fail).
  Exactly one may win each race; the others must get a domain error (or the sweeper's
  no-op), and the database must show one attempt per task, one final state, gap-free
  event numbers.
- siblings: the dependencies of one waiting task all succeed at once, one per process
  (attempt_complete): every completion wins, and the dependent must become ready exactly
  once (neither stuck waiting because each saw the other still running, nor released
  twice).
- create: one process completes a running task while another creates a task that depends
  on it: the new task must end up ready, released at most once.

Used by tests/test_concurrency.py (CI size) and by `make bench` (bigger, with timings):
    python -m tests.bench.concurrency --races 5000 --workers 4
"""

import argparse
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.bench.common import close_connections_before_fork


@dataclass
class RaceReport:
    kind: str
    races: int
    workers: int
    seconds: float
    outcomes: Counter = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)

    @property
    def races_per_second(self) -> float:
        return self.races / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.kind}: {self.races} races x {self.workers} processes in {self.seconds:.1f}s "
            f"({self.races_per_second:.0f} races/s); outcomes {dict(self.outcomes)}; "
            f"anomalies {len(self.anomalies)}"
        )


def _setup(races: int, workers: int, kind: str) -> dict:
    from django.db.models import F

    from apps.devices.models import Agent, AgentStatus, Device
    from apps.groups.models import Group
    from apps.tasks.models import Task

    group = Group.objects.create(
        name=f"race {kind} {time.time_ns()}", slug=f"race-{time.time_ns()}"
    )
    agents = []
    for i in range(workers):
        device = Device.objects.create(
            group=group,
            name=f"d{i}",
            token_hash=f"{group.id}-{i}".ljust(64, "x"),
            token_prefix="x",
            paired_at="2026-01-01T00:00:00Z",
        )
        agents.append(
            Agent.objects.create(
                group=group,
                device=device,
                name=f"a{i}",
                toolkits={},
                capacity=races + 1,
                status=AgentStatus.ONLINE,
            ).id
        )
    tasks = Task.objects.bulk_create(
        [Task(group=group, title=f"t{i}", max_attempts=3, status="ready") for i in range(races)]
    )
    Task.objects.filter(group=group).update(root_id=F("id"))
    attempts: list = []
    if kind == "siblings":
        Task.objects.filter(group=group).update(status="waiting")
        attempts = [[_running_dependency(group, task, a) for a in agents] for task in tasks]
    elif kind in ("finish", "create"):
        attempts = [_running(task.id, agents[0]) for task in tasks]
    if kind != "assign":
        # Ending an attempt matches its agent again at once (request_matching_for_agent):
        # drained devices take no new work, so each raced task keeps the state the race
        # left it in.
        Device.objects.filter(group=group).update(draining=True)
    return {
        "group_id": group.id,
        "agents": agents,
        "tasks": [t.id for t in tasks],
        "attempts": attempts,
    }


def _running(task_id: int, agent_id: int) -> int:
    """Assign a ready task to the agent and accept it; the attempt's id."""
    from apps.devices.models import Agent
    from apps.tasks.services import attempt_accept, task_assign

    attempt = task_assign(task_id=task_id, agent_id=agent_id)
    agent = Agent.objects.get(id=agent_id)
    attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)
    return attempt.id


def _running_dependency(group, dependent, agent_id: int) -> int:
    """A new task the dependent waits on, running on the agent; the attempt's id."""
    from apps.tasks.models import Task, TaskDependency

    dependency = Task.objects.create(
        group=group, title="dependency", status="ready", max_attempts=3
    )
    Task.objects.filter(id=dependency.id).update(root_id=dependency.id)
    TaskDependency.objects.create(task=dependent, depends_on=dependency)
    return _running(dependency.id, agent_id)


def _worker(index: int, kind: str, plan: dict, barrier, results) -> None:
    from django.db import connections

    connections.close_all()  # never share the parent's socket
    from apps.devices.models import Agent
    from apps.tasks.services import (
        attempt_complete,
        attempt_fail,
        attempt_lose,
        task_assign,
        task_create,
    )
    from claw.errors import DomainError

    agent = Agent.objects.select_related("group").get(
        id=plan["agents"][0 if kind in ("finish", "create") else index]
    )
    outcomes = []
    for race, task_id in enumerate(plan["tasks"]):
        barrier.wait()
        try:
            if kind == "assign":
                task_assign(task_id=task_id, agent_id=agent.id)
                outcomes.append((race, "won"))
            elif kind == "create":
                if index == 0:
                    attempt_complete(
                        attempt_id=plan["attempts"][race], agent=agent, epoch=1, result=0
                    )
                else:
                    task_create(group=agent.group, agent=agent, title="next", depends_on=[task_id])
                outcomes.append((race, "won"))
            elif kind == "siblings":
                attempt_id = plan["attempts"][race][index]
                attempt_complete(attempt_id=attempt_id, agent=agent, epoch=1, result=index)
                outcomes.append((race, "won"))
            else:
                attempt_id = plan["attempts"][race]
                role = index % 3
                if role == 0:
                    attempt_complete(attempt_id=attempt_id, agent=agent, epoch=1, result=index)
                    outcomes.append((race, "won"))
                elif role == 1:
                    won = attempt_lose(attempt_id=attempt_id, reason="race") is not None
                    outcomes.append((race, "won" if won else "noop"))
                else:
                    attempt_fail(
                        attempt_id=attempt_id, agent=agent, epoch=1, error="race", retryable=True
                    )
                    outcomes.append((race, "won"))
        except DomainError as exc:
            outcomes.append((race, exc.code))
        except Exception as exc:
            outcomes.append((race, f"crash:{type(exc).__name__}:{exc}"))
    results.put((index, outcomes))
    connections.close_all()


def _check(kind: str, plan: dict, per_race: dict[int, list[str]]) -> list[str]:
    from apps.events.models import Event
    from apps.tasks.models import Attempt, Task

    anomalies = []
    for race, outcomes in per_race.items():
        winners = outcomes.count("won")
        if winners != (len(outcomes) if kind in ("siblings", "create") else 1):
            anomalies.append(f"race {race}: {winners} winners {outcomes}")
        for outcome in outcomes:
            if outcome.startswith("crash"):
                anomalies.append(f"race {race}: {outcome}")
    tasks = {t.id: t for t in Task.objects.filter(group_id=plan["group_id"])}
    attempts = Counter(
        Attempt.objects.filter(task__group_id=plan["group_id"]).values_list("task_id", flat=True)
    )
    live = Counter(
        Attempt.objects.filter(
            task__group_id=plan["group_id"], status__in=["offered", "running"]
        ).values_list("task_id", flat=True)
    )
    if kind in ("siblings", "create"):
        anomalies += _check_released(kind, plan, tasks)
    one_attempt_each = plan["tasks"] if kind in ("assign", "finish") else []
    for task_id in one_attempt_each:
        task = tasks[task_id]
        if attempts[task_id] != 1:
            anomalies.append(f"task {task_id}: {attempts[task_id]} attempts")
        if kind == "assign" and (
            task.status != "assigned" or live[task_id] != 1 or task.epoch != 1
        ):
            anomalies.append(
                f"task {task_id}: {task.status} epoch {task.epoch} live {live[task_id]}"
            )
        if kind == "finish" and (live[task_id] != 0 or task.status not in {"succeeded", "ready"}):
            anomalies.append(f"task {task_id}: {task.status} with {live[task_id]} live attempts")
    seqs = list(
        Event.objects.filter(group_id=plan["group_id"])
        .order_by("seq")
        .values_list("seq", flat=True)
    )
    if seqs != list(range(1, len(seqs) + 1)):
        anomalies.append("event sequence has gaps or duplicates")
    return anomalies


def _check_released(kind: str, plan: dict, tasks: dict) -> list[str]:
    """siblings: each raced task ready, released exactly once, its dependencies succeeded.
    create: each created task ready, released at most once (it may have been ready from
    the start)."""
    from apps.events.models import Event

    released = Counter(
        Event.objects.filter(group_id=plan["group_id"], kind="task.ready").values_list(
            "task_id", flat=True
        )
    )
    raced, others = set(plan["tasks"]), [t for t in tasks.values() if t.id not in plan["tasks"]]
    anomalies = []
    if kind == "siblings":
        checked, most, least = [tasks[i] for i in plan["tasks"]], 1, 1
        unfinished = [t.id for t in others if t.status != "succeeded"]
        if unfinished:
            anomalies.append(f"dependencies not succeeded: {unfinished[:10]}")
    else:
        checked, most, least = others, 1, 0
        if len(others) != len(raced):
            anomalies.append(f"{len(others)} tasks created, not {len(raced)}")
    for task in checked:
        if task.status != "ready" or not least <= released[task.id] <= most:
            anomalies.append(f"task {task.id}: {task.status}, released {released[task.id]} times")
    return anomalies


def run_races(*, races: int, workers: int, kind: str) -> RaceReport:

    plan = _setup(races, workers, kind)
    close_connections_before_fork()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(i, kind, plan, barrier, results)) for i in range(workers)
    ]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    collected = [results.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join(timeout=30)
    per_race: dict[int, list[str]] = {race: [] for race in range(races)}
    for _, outcomes in collected:
        for race, outcome in outcomes:
            per_race[race].append(outcome)
    report = RaceReport(kind=kind, races=races, workers=workers, seconds=elapsed)
    for outcomes in per_race.values():
        report.outcomes.update(outcomes)
    report.anomalies = _check(kind, plan, per_race)
    return report


def _bench_database() -> None:
    """Point Django at a fresh claw_bench database on the local PostgreSQL and migrate it."""
    import psycopg

    url = os.environ.get(
        "CLAW_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/claw_bench"
    )
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["CLAW_DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "claw.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--races", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    _bench_database()
    reports = {}
    for kind in ("assign", "finish", "siblings", "create"):
        reports[kind] = report = run_races(races=args.races, workers=args.workers, kind=kind)
        print(report.summary())
        for anomaly in report.anomalies[:20]:
            print("  ANOMALY", anomaly)
    # Baseline in the same run: the same assignments made by one process, no contention.
    single = run_races(races=args.races, workers=1, kind="assign")
    print(single.summary())
    ratio = reports["assign"].races_per_second / single.races_per_second
    print(f"contended ({args.workers} processes) vs uncontended race rate: {ratio:.2f}x")
    if any(r.anomalies for r in reports.values()) or single.anomalies:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
