"""Bulk creation: a whole task graph in one transaction.

task_graph_create takes up to MAX_GRAPH_TASKS task specs that name each other by
client-side keys (`depends_on`, `parent`) and may name existing tasks of the group by id
(`depends_on_ids`, `parent_id`). Each task's fields are checked exactly as task_create
checks them (the same helpers), the graph as a whole (unique keys, known keys, no
dependency or parent cycle); any error names the task by key and index and nothing is
written. The tasks then start as task_create would start each of them, one after the
other in dependency order (ready, waiting, blocked, or held for a before_start
approval), written with one insert of the tasks, one of their dependencies and one of
their `task.created` events, whatever the graph's size.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from apps.devices.models import Agent, Toolkit
from apps.events.services import event_append_many, execute_with_arrays
from apps.groups.models import CheckpointPolicy, Group
from apps.tasks.models import Task, TaskDependency, TaskStatus
from apps.tasks.services import (
    _ask_to_start,
    _check_dependency_count,
    _lock_dependencies,
    _parent_roots,
    _require_writer,
    _status_from_dependencies,
    _validated_task_fields,
    _validated_toolkits,
    request_matching,
)
from claw.errors import InvalidInput

MAX_GRAPH_TASKS = 5000
MAX_KEY = 100


@dataclass(frozen=True)
class CreatedTask:
    id: int
    status: str


@dataclass
class GraphTask:
    """One task of a graph: task_create's arguments, with references by key."""

    key: str
    title: str
    instructions: str = ""
    steps: list | None = None
    required_toolkits: list[str] | None = None
    priority: int = 0
    max_attempts: int | None = None
    checkpoint_policy: str | None = None
    dependency_failure_policy: str | None = None
    parent: str | None = None  # the key of another task of the graph
    parent_id: int | None = None  # an existing task of the group
    depends_on: list[str] = field(default_factory=list)  # keys of tasks of the graph
    depends_on_ids: list[int] = field(default_factory=list)  # existing tasks of the group


def _named(exc: InvalidInput, index: int, key) -> InvalidInput:
    """The error, naming the task it is about by key and index."""
    return InvalidInput(
        f"tasks[{index}] ({key}): {exc.message}",
        code=exc.code,
        details={**exc.details, "key": key, "index": index},
    )


@contextmanager
def _naming(index: int, key) -> Iterator[None]:
    try:
        yield
    except InvalidInput as exc:
        raise _named(exc, index, key) from None


def _named_after_first(specs: list[GraphTask], exc: InvalidInput, refers) -> InvalidInput:
    """An error about existing tasks, raised for the whole graph, named after the first
    task that refers to one of them (`refers(spec)`)."""
    index = next((i for i, spec in enumerate(specs) if refers(spec)), 0)
    return _named(exc, index, specs[index].key)


def _dependency_order(keys: list[str], deps: list[list[int]]) -> list[int]:
    """Task indexes with every task after its dependencies: layer by layer, each layer in
    the order the tasks were given (the planner's order, so ids follow it). A cycle is
    dependency_cycle naming one task on it and the cycle's keys."""
    waiting = [len(d) for d in deps]
    dependents: list[list[int]] = [[] for _ in keys]
    for index, task_deps in enumerate(deps):
        for dep in task_deps:
            dependents[dep].append(index)
    order: list[int] = []
    layer = [index for index, count in enumerate(waiting) if count == 0]
    while layer:
        order.extend(layer)
        following = []
        for index in layer:
            for dependent in dependents[index]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    following.append(dependent)
        layer = sorted(following)
    if len(order) < len(keys):
        # Every task left waits for another task left: walking back along those leads
        # round a cycle.
        node, path = next(i for i, count in enumerate(waiting) if count), {}
        while node not in path:
            path[node] = len(path)
            node = next(dep for dep in deps[node] if waiting[dep])
        cycle = list(path)[path[node] :]
        first = min(cycle)
        cycle = cycle[cycle.index(first) :] + cycle[: cycle.index(first)]
        names = [keys[i] for i in cycle]
        raise InvalidInput(
            f"tasks[{first}] ({keys[first]}): the dependencies make a cycle: "
            f"{' -> '.join([*names, names[0]])}.",
            code="dependency_cycle",
            details={"key": keys[first], "index": first, "cycle": names},
        )
    return order


def _check_parents(keys: list[str], parents: list[int | None]) -> None:
    """parent_cycle when following parents by key leads back to a task."""
    done = [False] * len(keys)
    for start in range(len(keys)):
        path, node = [], start
        while node is not None and not done[node]:
            if node in path:
                cycle = path[path.index(node) :]
                first = min(cycle)
                raise InvalidInput(
                    f"tasks[{first}] ({keys[first]}): the parents make a cycle: "
                    f"{', '.join(keys[i] for i in sorted(cycle))}.",
                    code="parent_cycle",
                    details={"key": keys[first], "index": first},
                )
            path.append(node)
            node = parents[node]
        for visited in path:
            done[visited] = True


def task_graph_create(
    *,
    group: Group,
    tasks: list[GraphTask],
    actor: AbstractBaseUser | None = None,
    agent: Agent | None = None,
) -> dict[str, CreatedTask]:
    """Create a graph of tasks at once (member+, or an agent of the group), all or nothing.
    Returns the created tasks' ids and statuses by key, in the order given."""
    _require_writer(group_id=group.id, actor=actor, agent=agent)
    if not tasks:
        raise InvalidInput("A task graph needs at least one task.", code="empty_graph")
    if len(tasks) > MAX_GRAPH_TASKS:
        raise InvalidInput(
            f"A task graph has at most {MAX_GRAPH_TASKS} tasks (this one has {len(tasks)}).",
            code="too_many_tasks",
            details={"limit": MAX_GRAPH_TASKS, "count": len(tasks)},
        )
    keys: list[str] = []
    index_of: dict[str, int] = {}
    for index, spec in enumerate(tasks):
        with _naming(index, spec.key):
            if not isinstance(spec.key, str) or not 1 <= len(spec.key) <= MAX_KEY:
                raise InvalidInput(
                    f"A key is a string of 1 to {MAX_KEY} characters.", code="invalid_key"
                )
            if spec.key in index_of:
                raise InvalidInput(
                    f"The key {spec.key!r} is used twice (first by tasks[{index_of[spec.key]}]).",
                    code="duplicate_key",
                )
        index_of[spec.key] = index
        keys.append(spec.key)

    slugs = {slug for spec in tasks for slug in spec.required_toolkits or []}
    known = set(Toolkit.objects.filter(slug__in=slugs).values_list("slug", flat=True))
    fields, toolkits, deps, dep_ids, parents = [], [], [], [], []
    for index, spec in enumerate(tasks):
        with _naming(index, spec.key):
            fields.append(
                _validated_task_fields(
                    group=group,
                    title=spec.title,
                    priority=spec.priority,
                    max_attempts=spec.max_attempts,
                    steps=spec.steps,
                    checkpoint_policy=spec.checkpoint_policy,
                    dependency_failure_policy=spec.dependency_failure_policy,
                )
            )
            toolkits.append(_validated_toolkits(spec.required_toolkits, known=known))
            task_deps = []
            for dep in dict.fromkeys(spec.depends_on):
                if dep not in index_of:
                    raise InvalidInput(
                        f"depends on {dep!r}, which is not a key of this graph.",
                        code="unknown_key",
                        details={"unknown": dep},
                    )
                if dep == spec.key:
                    raise InvalidInput("A task cannot depend on itself.", code="dependency_cycle")
                task_deps.append(index_of[dep])
            existing = sorted(set(spec.depends_on_ids))
            _check_dependency_count(len(task_deps) + len(existing))
            deps.append(task_deps)
            dep_ids.append(existing)
            parent = None
            if spec.parent is not None:
                if spec.parent_id is not None:
                    raise InvalidInput("Give parent (a key) or parent_id (a task id), not both.")
                if spec.parent not in index_of:
                    raise InvalidInput(
                        f"has the parent {spec.parent!r}, which is not a key of this graph.",
                        code="unknown_key",
                        details={"unknown": spec.parent},
                    )
                parent = index_of[spec.parent]
            parents.append(parent)
    order = _dependency_order(keys, deps)
    _check_parents(keys, parents)

    with transaction.atomic():
        try:
            existing_roots = _parent_roots(
                group_id=group.id,
                parent_ids=[s.parent_id for s in tasks if s.parent_id is not None],
            )
        except InvalidInput as exc:
            missing = exc.details.get("parent_id")
            raise _named_after_first(tasks, exc, lambda s: s.parent_id == missing) from None
        try:
            existing_status = _lock_dependencies(
                group_id=group.id, dep_ids={dep for ids in dep_ids for dep in ids}
            )
        except InvalidInput as exc:
            missing = set(exc.details.get("missing", []))
            raise _named_after_first(
                tasks, exc, lambda s: not missing.isdisjoint(s.depends_on_ids)
            ) from None

        # Each task as task_create would start it, its dependencies created before it.
        status: list[str] = [""] * len(tasks)
        held: list[bool] = [False] * len(tasks)
        for index in order:
            status[index] = _status_from_dependencies(
                [existing_status[dep] for dep in dep_ids[index]]
                + [status[dep] for dep in deps[index]]
            )
            held[index] = (
                status[index] == TaskStatus.READY
                and fields[index]["checkpoint_policy"] == CheckpointPolicy.BEFORE_START
            )
            if held[index]:
                status[index] = TaskStatus.WAITING
        # Ids in dependency order, so a task's dependencies are older than it.
        ids = dict(zip(order, _reserve_task_ids(len(tasks)), strict=True))
        parent_ids = [
            spec.parent_id if parents[i] is None else ids[parents[i]]
            for i, spec in enumerate(tasks)
        ]
        roots = _roots(ids, parents, parent_ids, existing_roots)
        all_deps = {i: sorted([*dep_ids[i], *(ids[d] for d in deps[i])]) for i in order}
        rows = [
            {
                "id": ids[i],
                "parent_id": parent_ids[i],
                "root_id": roots[i],
                "instructions": tasks[i].instructions,
                "required_toolkits": toolkits[i],
                "status": status[i],
                **fields[i],
            }
            for i in order
        ]
        _insert_tasks(group=group, rows=rows, actor=actor if agent is None else None, agent=agent)
        _insert_dependencies([(ids[i], dep) for i in order for dep in all_deps[i]])
        event_append_many(
            group_id=group.id,
            events=[
                {
                    "kind": "task.created",
                    "task_id": ids[i],
                    "agent_id": agent.id if agent else None,
                    "actor_id": actor.pk if actor and not agent else None,
                    "payload": {
                        "title": fields[i]["title"],
                        "status": status[i],
                        "depends_on": all_deps[i],
                    },
                }
                for i in order
            ],
        )
        held_ids = [ids[i] for i in order if held[i]]
        for task in Task.objects.filter(id__in=held_ids).select_related("group").order_by("id"):
            _ask_to_start(task)
        if TaskStatus.READY in status:
            request_matching(group.id)
    return {spec.key: CreatedTask(id=ids[i], status=status[i]) for i, spec in enumerate(tasks)}


def _roots(
    ids: dict[int, int],
    parents: list[int | None],
    parent_ids: list[int | None],
    existing_roots: dict[int, int],
) -> list[int]:
    """Each new task's root: itself at the top, else its parent's root (up the parents
    given by key, to a task at the top or under an existing task)."""
    roots: list[int | None] = [None] * len(parents)
    for index in range(len(parents)):
        chain, node = [], index
        while roots[node] is None and parents[node] is not None:
            chain.append(node)
            node = parents[node]
        if roots[node] is None:
            parent_id = parent_ids[node]
            roots[node] = ids[node] if parent_id is None else existing_roots[parent_id]
        for below in chain:
            roots[below] = roots[node]
    return roots


def _reserve_task_ids(count: int) -> list[int]:
    """`count` new task ids, taken before the insert so that parents, roots and
    dependencies can name them."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT nextval(pg_get_serial_sequence('tasks_task', 'id')) "
                "FROM generate_series(1, %s)",
                [count],
            )
            return [row[0] for row in cursor.fetchall()]
        # SQLite: the transaction took the database's write lock at BEGIN (IMMEDIATE), so
        # nobody else can take these numbers meanwhile.
        cursor.execute(
            "SELECT MAX(n) FROM (SELECT MAX(id) AS n FROM tasks_task UNION ALL "
            "SELECT seq FROM sqlite_sequence WHERE name = 'tasks_task')"
        )
        last = cursor.fetchone()[0] or 0
    return list(range(last + 1, last + 1 + count))


# The varying columns travel as one array each (execute_with_arrays); JSON as text.
INSERT_TASKS = """
INSERT INTO tasks_task
    (id, group_id, parent_id, root_id, title, instructions, steps, required_toolkits,
     priority, status, max_attempts, epoch, attempt_floor, checkpoint_policy,
     dependency_failure_policy, feedback, created_by_user_id, created_by_agent_id,
     created_at, updated_at, ready_at)
SELECT t.id, %s, t.parent_id, t.root_id, t.title, t.instructions, t.steps::jsonb,
       t.required_toolkits::jsonb, t.priority, t.status, t.max_attempts, 0, 0,
       t.checkpoint_policy, t.dependency_failure_policy, '', %s, %s, %s, %s, %s
FROM unnest(%b::bigint[], %b::bigint[], %b::bigint[], %b::text[], %b::text[], %b::text[],
            %b::text[], %b::int[], %b::text[], %b::int[], %b::text[], %b::text[])
     AS t (id, parent_id, root_id, title, instructions, steps, required_toolkits, priority,
           status, max_attempts, checkpoint_policy, dependency_failure_policy)
"""
INSERT_DEPENDENCIES = """
INSERT INTO tasks_taskdependency (task_id, depends_on_id)
SELECT * FROM unnest(%b::bigint[], %b::bigint[])
"""
JSON_COLUMNS = ("steps", "required_toolkits")
ROW_COLUMNS = (
    "id",
    "parent_id",
    "root_id",
    "title",
    "instructions",
    "steps",
    "required_toolkits",
    "priority",
    "status",
    "max_attempts",
    "checkpoint_policy",
    "dependency_failure_policy",
)


def _insert_tasks(
    *, group: Group, rows: list[dict], actor: AbstractBaseUser | None, agent: Agent | None
) -> None:
    """One insert of the tasks: on PostgreSQL an array per column, bound on the server
    (Django's bulk_create spent most of a 4,000-task graph compiling and quoting)."""
    if connection.vendor != "postgresql":
        Task.objects.bulk_create(
            Task(group=group, created_by_user=actor, created_by_agent=agent, **row) for row in rows
        )
        return
    arrays = [
        [json.dumps(row[column]) for row in rows]
        if column in JSON_COLUMNS
        else [row[column] for row in rows]
        for column in ROW_COLUMNS
    ]
    now = timezone.now()
    params = [group.id, actor.pk if actor else None, agent.id if agent else None, now, now, now]
    execute_with_arrays(INSERT_TASKS, [*params, *arrays])


def _insert_dependencies(pairs: list[tuple[int, int]]) -> None:
    if not pairs:
        return
    if connection.vendor != "postgresql":
        TaskDependency.objects.bulk_create(
            TaskDependency(task_id=task_id, depends_on_id=dep) for task_id, dep in pairs
        )
        return
    execute_with_arrays(INSERT_DEPENDENCIES, [[p[0] for p in pairs], [p[1] for p in pairs]])
