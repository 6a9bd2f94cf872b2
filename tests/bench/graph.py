"""Bulk creation of a task graph, services mode (PostgreSQL), on a fresh database per run.

A layered DAG of --tasks tasks (--width tasks a layer, each depending on 1 to 3 tasks of
the layer before; every task with a toolkit, a step and a few lines of instructions) is
created --rounds times:

    graph API       one POST /api/v1/groups/SLUG/tasks/graph through Django's test Client
                    (a personal API token; JSON parsing, the schema, the service, the answer)
    graph service   task_graph_create alone

against a baseline measured in the same run: --single tasks of the same shape created one
by one through task_create, extrapolated to --tasks. It also counts the statements of the
service at two sizes (the count must not grow with the graph). Target: the API's median
<= 2 s for 4,000 tasks.

    python -m tests.bench.graph                      # 4,000 tasks, 3 rounds
    python -m tests.bench.graph --tasks 500 --single 50 --rounds 1
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import urllib.parse
from pathlib import Path

from tests.bench.common import bench_database, log

TARGET_S = 2.0


def layered_specs(count: int, width: int, seed: int) -> list[dict]:
    """The graph as the API takes it: keys, dependencies on the previous layer."""
    rng = random.Random(seed)
    specs, previous = [], []
    for layer_start in range(0, count, width):
        layer = []
        for i in range(layer_start, min(count, layer_start + width)):
            key = f"t{i}"
            deps = rng.sample(previous, min(len(previous), rng.randint(1, 3)))
            specs.append(
                {
                    "key": key,
                    "title": f"Task {i}",
                    "instructions": f"Process shard {i} of the data set, then write its summary.",
                    "required_toolkits": ["shell"],
                    "steps": [{"tool": "shell", "args": {"cmd": f"echo {i}"}}],
                    "depends_on": deps,
                }
            )
            layer.append(key)
        previous = layer
    return specs


def run(args) -> int:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from apps.groups.models import Group, Membership, Role
    from apps.groups.services import api_token_create
    from apps.tasks.graphs import GraphTask, task_graph_create
    from apps.tasks.models import Task
    from apps.tasks.services import task_create

    user = get_user_model().objects.create_user(username="bench", password="bench-pw")
    group = Group.objects.create(name="Bench", slug="bench")
    Membership.objects.create(group=group, user=user, role=Role.MEMBER)
    _, raw = api_token_create(user=user, name="bench")
    client = Client(headers={"Authorization": f"Bearer {raw}"})

    # Baseline: the same shape, one task_create per task.
    specs = layered_specs(args.single, args.width, args.seed)
    started = time.perf_counter()
    ids: dict[str, int] = {}
    for spec in specs:
        task = task_create(
            group=group,
            actor=user,
            title=spec["title"],
            instructions=spec["instructions"],
            required_toolkits=spec["required_toolkits"],
            steps=spec["steps"],
            depends_on=[ids[key] for key in spec["depends_on"]],
        )
        ids[spec["key"]] = task.id
    single_s = time.perf_counter() - started
    extrapolated = single_s / args.single * args.tasks

    specs = layered_specs(args.tasks, args.width, args.seed)
    body = json.dumps({"tasks": specs})
    api_times, service_times = [], []
    for round_ in range(args.rounds):
        started = time.perf_counter()
        response = client.post("/api/v1/groups/bench/tasks/graph", body, "application/json")
        api_times.append(time.perf_counter() - started)
        if response.status_code != 201:
            raise SystemExit(f"POST answered {response.status_code}: {response.content[:500]}")
        log(f"round {round_ + 1}: API {api_times[-1]:.3f} s")
        graph = [GraphTask(**spec) for spec in specs]
        started = time.perf_counter()
        task_graph_create(group=group, actor=user, tasks=graph)
        service_times.append(time.perf_counter() - started)
        log(f"round {round_ + 1}: service {service_times[-1]:.3f} s")

    queries = {}
    for size in (2 * args.width, args.tasks):  # two layers: dependencies too
        graph = [GraphTask(**spec) for spec in layered_specs(size, args.width, args.seed)]
        with CaptureQueriesContext(connection) as captured:
            task_graph_create(group=group, actor=user, tasks=graph)
        queries[size] = len(captured)
    expected = args.single + 2 * args.rounds * args.tasks + 2 * args.width + args.tasks
    if Task.objects.filter(group=group).count() != expected:
        raise SystemExit("the group does not hold the tasks created")

    api, service = statistics.median(api_times), statistics.median(service_times)
    print()
    print(f"{args.tasks} tasks, layers of {args.width}, each on 1-3 tasks of the layer before")
    print(f"{'':<34} {'median s':>9} {'best s':>8} {'tasks/s':>9}")
    print(
        f"{'graph API (one POST)':<34} {api:>9.3f} {min(api_times):>8.3f} {args.tasks / api:>9.0f}"
    )
    row = f"{'graph service (task_graph_create)':<34} {service:>9.3f} {min(service_times):>8.3f}"
    print(f"{row} {args.tasks / service:>9.0f}")
    print(
        f"{'one by one (task_create), ' + str(args.single):<34} {single_s:>9.3f} {'':>8} "
        f"{args.single / single_s:>9.0f}   -> {extrapolated:.1f} s for {args.tasks}"
    )
    print(f"one POST vs one by one: {extrapolated / api:.0f}x faster")
    print("statements: " + ", ".join(f"{n} tasks: {q}" for n, q in queries.items()))
    ok = api <= TARGET_S
    print(f"target: {args.tasks} tasks in one request <= {TARGET_S} s: {'met' if ok else 'MISSED'}")
    return 0 if ok or args.tasks != 4000 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--width", type=int, default=100, help="tasks per layer")
    parser.add_argument("--single", type=int, default=200, help="baseline: tasks one by one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--keep-database", action="store_true")
    args = parser.parse_args()
    url = args.database_url or os.environ.get(
        "CLAW_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/claw_bench_graph"
    )
    if urllib.parse.urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        parser.error("this benchmark only talks to 127.0.0.1")
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "claw.settings",
            "CLAW_DATABASE_URL": url,
            "CLAW_DATA_DIR": str(Path(tempfile.mkdtemp(prefix="claw-bench-graph-")) / "data"),
            "CLAW_DEBUG": "0",
            "CLAW_LOG_LEVEL": "WARNING",
        }
    )
    os.environ.pop("CLAW_REDIS_URL", None)  # nothing here consumes the matching it enqueues
    with bench_database(url, args.keep_database):
        code = run(args)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
