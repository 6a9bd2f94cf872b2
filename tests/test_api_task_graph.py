"""Bulk creation: POST /groups/SLUG/tasks/graph (apps/tasks/graphs.py task_graph_create)
creates a whole task graph in one transaction, each task as task_create would create it."""

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from apps.checkpoints.models import Checkpoint, CheckpointKind
from apps.events.models import Event
from apps.groups.models import Group
from apps.tasks.graphs import MAX_GRAPH_TASKS, GraphTask, task_graph_create
from apps.tasks.models import Task, TaskDependency, TaskStatus
from apps.tasks.services import task_cancel, task_create
from claw.errors import InvalidInput, NotFound
from tests.test_api_support import assert_error, body, client_for, send

MODELS = (Task, TaskDependency, Event, Checkpoint)


def counts() -> dict:
    return {model.__name__: model.objects.count() for model in MODELS}


@pytest.fixture
def unchanged(personas):
    """Asserts, after the test, that nothing was written."""
    before = counts()
    yield
    assert counts() == before


@pytest.fixture
def matching(monkeypatch):
    """The groups whose matching was requested (on commit)."""
    asked: list[int] = []
    monkeypatch.setattr("apps.tasks.tasks.match_group.delay", asked.append)
    return asked


def post_graph(user, tasks, slug="research"):
    return send(client_for(user), "POST", f"/groups/{slug}/tasks/graph", {"tasks": tasks})


def layered(count: int, width: int = 10, **extra) -> list[dict]:
    """A layered DAG: each task after one to three tasks of the layer before."""
    tasks = []
    for i in range(count):
        layer_start = i - i % width
        previous = range(max(0, layer_start - width), layer_start)
        deps = [f"t{j}" for j in previous if (i + j) % 4 == 0][:3] or (
            [f"t{previous[0]}"] if previous else []
        )
        tasks.append({"key": f"t{i}", "title": f"Task {i}", "depends_on": deps, **extra})
    return tasks


def test_a_graph_is_created_with_its_dependencies_and_readiness(
    personas, matching, django_capture_on_commit_callbacks
):
    done = task_create(group=personas.group, actor=personas.member, title="Collected")
    Task.objects.filter(id=done.id).update(status=TaskStatus.SUCCEEDED)
    pending = task_create(group=personas.group, actor=personas.member, title="Still running")

    with django_capture_on_commit_callbacks(execute=True):
        response = post_graph(
            personas.member,
            [
                {
                    "key": "fetch",
                    "title": "  Fetch the data  ",
                    "required_toolkits": ["shell", "shell"],
                    "steps": [{"tool": "shell", "args": {"cmd": "make fetch"}}],
                    "priority": 5,
                    "depends_on_ids": [done.id],
                },
                {"key": "clean", "title": "Clean it", "depends_on": ["fetch"], "max_attempts": 7},
                {"key": "chart", "title": "Chart it", "depends_on": ["fetch", "clean", "fetch"]},
                {"key": "later", "title": "After the other work", "depends_on_ids": [pending.id]},
                {
                    "key": "report",
                    "title": "Write the report",
                    "depends_on": ["chart"],
                    "depends_on_ids": [done.id],
                    "dependency_failure_policy": "cancel",
                },
            ],
        )

    assert response.status_code == 201, response.content
    answer = body(response)
    assert list(answer["ids"]) == ["fetch", "clean", "chart", "later", "report"]
    assert answer["statuses"] == {"ready": 1, "waiting": 4}
    tasks = {key: Task.objects.get(id=task_id) for key, task_id in answer["ids"].items()}
    fetch, clean, chart, later, report = tasks.values()
    assert fetch.status == TaskStatus.READY  # its only dependency already succeeded
    assert {t.status for t in (clean, chart, later, report)} == {TaskStatus.WAITING}
    assert fetch.title == "Fetch the data" and fetch.required_toolkits == ["shell"]
    assert fetch.steps == [{"tool": "shell", "args": {"cmd": "make fetch"}}]
    assert fetch.priority == 5 and fetch.max_attempts == personas.group.max_attempts
    assert clean.max_attempts == 7
    assert report.dependency_failure_policy == "cancel"
    assert chart.dependency_failure_policy == personas.group.dependency_failure_policy
    assert chart.checkpoint_policy == personas.group.default_checkpoint_policy
    deps = {key: set(t.dependencies.values_list("id", flat=True)) for key, t in tasks.items()}
    assert deps == {
        "fetch": {done.id},
        "clean": {fetch.id},
        "chart": {fetch.id, clean.id},
        "later": {pending.id},
        "report": {chart.id, done.id},
    }
    assert all(t.root_id == t.id and t.parent_id is None for t in tasks.values())
    assert all(t.created_by_user_id == personas.member.id for t in tasks.values())
    # Ids follow the dependencies: a task is younger than what it waits for.
    assert fetch.id < clean.id < chart.id < report.id
    assert matching == [personas.group.id]


def test_tasks_after_a_failed_dependency_are_blocked_as_one_by_one(personas):
    failed = task_create(group=personas.group, actor=personas.member, title="Broke")
    task_cancel(actor=personas.member, task=failed)

    response = post_graph(
        personas.member,
        [
            {"key": "a", "title": "After the broken one", "depends_on_ids": [failed.id]},
            {"key": "b", "title": "After a", "depends_on": ["a"]},
            {"key": "c", "title": "Free"},
        ],
    )

    ids = body(response)["ids"]
    statuses = dict(Task.objects.filter(id__in=ids.values()).values_list("id", "status"))
    assert {key: statuses[ids[key]] for key in ids} == {
        "a": TaskStatus.BLOCKED,
        "b": TaskStatus.BLOCKED,
        "c": TaskStatus.READY,
    }


def test_parents_by_key_or_id_set_the_tree(personas):
    goal = task_create(group=personas.group, actor=personas.member, title="Goal")
    sub = task_create(group=personas.group, actor=personas.member, title="Sub", parent_id=goal.id)

    response = post_graph(
        personas.member,
        [
            {"key": "leaf", "title": "Leaf", "parent": "branch"},
            {"key": "branch", "title": "Branch", "parent": "top"},
            {"key": "top", "title": "Top"},
            {"key": "under", "title": "Under an existing task", "parent_id": sub.id},
            {"key": "deeper", "title": "Deeper", "parent": "under"},
        ],
    )

    assert response.status_code == 201, response.content
    ids = body(response)["ids"]
    tree = {
        key: Task.objects.filter(id=ids[key]).values_list("parent_id", "root_id").get()
        for key in ids
    }
    assert tree == {
        "leaf": (ids["branch"], ids["top"]),
        "branch": (ids["top"], ids["top"]),
        "top": (None, ids["top"]),
        "under": (sub.id, goal.id),
        "deeper": (ids["under"], goal.id),
    }


def test_a_before_start_task_is_held_and_asks_once_its_dependencies_are_met(personas):
    response = post_graph(
        personas.member,
        [
            {"key": "gate", "title": "Deploy", "checkpoint_policy": "before_start"},
            {
                "key": "after",
                "title": "Announce",
                "checkpoint_policy": "before_start",
                "depends_on": ["gate"],
            },
            {"key": "free", "title": "Write notes"},
        ],
    )

    ids = body(response)["ids"]
    assert body(response)["statuses"] == {"waiting": 2, "ready": 1}
    [checkpoint] = Checkpoint.objects.filter(kind=CheckpointKind.BEFORE_START)
    assert checkpoint.task_id == ids["gate"]  # "after" asks once "gate" succeeds
    assert Task.objects.get(id=ids["gate"]).status == TaskStatus.WAITING
    raised = Event.objects.get(kind="checkpoint.raised")
    last_created = Event.objects.filter(kind="task.created").order_by("-seq").first()
    assert raised.seq == last_created.seq + 1


@pytest.mark.parametrize(
    ("who", "status", "code"),
    [
        ("owner", 201, None),
        ("approver", 201, None),
        ("member", 201, None),
        ("viewer", 403, "forbidden"),
        ("outsider", 404, "not_found"),
        ("anonymous", 401, "unauthenticated"),
    ],
)
def test_members_and_above_may_create_a_graph(personas, who, status, code):
    user = None if who == "anonymous" else getattr(personas, who)
    before = counts()

    response = post_graph(user, [{"key": "a", "title": "A"}])

    if code is None:
        assert response.status_code == status, response.content
        assert Task.objects.count() == before["Task"] + 1
    else:
        assert_error(response, status, code)
        assert counts() == before


def test_an_agent_of_the_group_may_create_a_graph(personas):
    created = task_graph_create(
        group=personas.group,
        agent=personas.agent,
        tasks=[GraphTask(key="a", title="A"), GraphTask(key="b", title="B", depends_on=["a"])],
    )

    tasks = Task.objects.filter(id__in=[t.id for t in created.values()])
    assert {t.created_by_agent_id for t in tasks} == {personas.agent.id}
    assert {t.created_by_user_id for t in tasks} == {None}
    with pytest.raises(NotFound):
        task_graph_create(
            group=personas.group, agent=personas.other_agent, tasks=[GraphTask(key="a", title="A")]
        )


def _other_group_task(personas):
    return task_create(group=personas.other_group, actor=personas.outsider, title="Theirs").id


@pytest.mark.parametrize(
    ("case", "tasks", "code", "key", "index"),
    [
        (
            "a key used twice",
            [{"key": "a", "title": "A"}, {"key": "b", "title": "B"}, {"key": "a", "title": "C"}],
            "duplicate_key",
            "a",
            2,
        ),
        (
            "a dependency on an unknown key",
            [{"key": "a", "title": "A"}, {"key": "b", "title": "B", "depends_on": ["a", "z"]}],
            "unknown_key",
            "b",
            1,
        ),
        (
            "an unknown parent key",
            [{"key": "a", "title": "A", "parent": "nobody"}],
            "unknown_key",
            "a",
            0,
        ),
        (
            "a parent by key and by id",
            [{"key": "a", "title": "A"}, {"key": "b", "title": "B", "parent": "a", "parent_id": 1}],
            "invalid",
            "b",
            1,
        ),
        (
            "a task depending on itself",
            [{"key": "a", "title": "A", "depends_on": ["a"]}],
            "dependency_cycle",
            "a",
            0,
        ),
        (
            "a cycle",
            [
                {"key": "free", "title": "Free"},
                {"key": "x", "title": "X", "depends_on": ["z"]},
                {"key": "y", "title": "Y", "depends_on": ["x", "free"]},
                {"key": "z", "title": "Z", "depends_on": ["y"]},
                {"key": "after", "title": "After", "depends_on": ["z"]},
            ],
            "dependency_cycle",
            "x",
            1,
        ),
        (
            "a parent cycle",
            [
                {"key": "a", "title": "A", "parent": "b"},
                {"key": "b", "title": "B", "parent": "a"},
            ],
            "parent_cycle",
            "a",
            0,
        ),
        (
            "an unknown toolkit",
            [{"key": "a", "title": "A"}, {"key": "b", "title": "B", "required_toolkits": ["zz"]}],
            "unknown_toolkit",
            "b",
            1,
        ),
        (
            "a blank title",
            [{"key": "a", "title": "A"}, {"key": "b", "title": "   "}],
            "invalid",
            "b",
            1,
        ),
        (
            "too many dependencies",
            [{"key": f"k{i}", "title": "K"} for i in range(60)]
            + [
                {
                    "key": "many",
                    "title": "Many",
                    "depends_on": [f"k{i}" for i in range(60)],
                    "depends_on_ids": list(range(1, 42)),
                }
            ],
            "invalid",
            "many",
            60,
        ),
        (
            "a schema error",
            [{"key": "a", "title": "A"}, {"key": "b", "title": "B", "priority": 101}],
            "validation_error",
            "b",
            1,
        ),
        (
            "an unknown field",
            [{"key": "a", "title": "A", "after": ["b"]}],
            "validation_error",
            "a",
            0,
        ),
    ],
)
def test_an_invalid_graph_is_refused_naming_the_task_and_writes_nothing(
    personas, unchanged, case, tasks, code, key, index
):
    response = post_graph(personas.member, tasks)

    error = assert_error(response, 422, code)
    assert (error["details"]["key"], error["details"]["index"]) == (key, index), case
    assert f"({key})" in error["message"]


def test_a_cycle_names_the_keys_round_it(personas, unchanged):
    response = post_graph(
        personas.member,
        [
            {"key": "x", "title": "X", "depends_on": ["z"]},
            {"key": "y", "title": "Y", "depends_on": ["x"]},
            {"key": "z", "title": "Z", "depends_on": ["y"]},
        ],
    )

    error = assert_error(response, 422, "dependency_cycle")
    assert error["details"]["cycle"] == ["x", "z", "y"]
    assert "x -> z -> y -> x" in error["message"]


def test_references_to_tasks_outside_the_group_are_refused(personas):
    theirs = _other_group_task(personas)
    ours = task_create(group=personas.group, actor=personas.member, title="Ours").id
    before = counts()

    dependency = post_graph(
        personas.member,
        [
            {"key": "a", "title": "A", "depends_on_ids": [ours]},
            {"key": "b", "title": "B", "depends_on_ids": [ours, theirs]},
        ],
    )
    parent = post_graph(
        personas.member,
        [{"key": "a", "title": "A"}, {"key": "b", "title": "B", "parent_id": theirs}],
    )

    error = assert_error(dependency, 422, "unknown_dependency")
    assert error["details"] == {"missing": [theirs], "key": "b", "index": 1}
    error = assert_error(parent, 422, "invalid")
    assert (error["details"]["key"], error["details"]["index"]) == ("b", 1)
    assert counts() == before


def test_more_than_5000_tasks_are_refused(personas, unchanged):
    tasks = [{"key": f"t{i}", "title": "T"} for i in range(MAX_GRAPH_TASKS + 1)]

    response = post_graph(personas.member, tasks)
    with pytest.raises(InvalidInput) as direct:
        task_graph_create(
            group=personas.group,
            actor=personas.member,
            tasks=[GraphTask(**task) for task in tasks],
        )

    error = assert_error(response, 422, "validation_error")
    assert error["details"]["errors"][0]["field"] == "tasks"
    assert direct.value.code == "too_many_tasks"
    assert_error(post_graph(personas.member, []), 422, "validation_error")


def test_5000_tasks_are_created_in_one_request(personas):
    response = post_graph(personas.member, layered(MAX_GRAPH_TASKS, width=100))

    assert response.status_code == 201, response.content
    assert body(response)["statuses"] == {"ready": 100, "waiting": 4900}
    assert Task.objects.filter(group=personas.group).count() == MAX_GRAPH_TASKS


def test_a_graph_appends_one_task_created_event_per_task_in_gap_free_order(personas):
    start = Group.objects.get(id=personas.group.id).event_seq

    ids = body(post_graph(personas.member, layered(30)))["ids"]

    events = list(Event.objects.filter(group=personas.group, seq__gt=start).order_by("seq"))
    assert [e.seq for e in events] == list(range(start + 1, start + 31))
    assert {e.kind for e in events} == {"task.created"}
    assert [e.task_id for e in events] == sorted(ids.values())
    assert {e.actor_id for e in events} == {personas.member.id}
    by_task = {e.task_id: e.payload for e in events}
    for task in Task.objects.filter(id__in=ids.values()):
        assert by_task[task.id] == {
            "title": task.title,
            "status": task.status,
            "depends_on": sorted(task.dependencies.values_list("id", flat=True)),
        }


@pytest.mark.postgres  # SQLite's inserts go in batches of its variable limit
def test_the_number_of_statements_does_not_grow_with_the_graph(personas):
    existing = task_create(group=personas.group, actor=personas.member, title="Existing").id

    def statements(count: int) -> int:
        tasks = [
            GraphTask(**task, depends_on_ids=[existing], required_toolkits=["shell"])
            for task in layered(count)
        ]
        with CaptureQueriesContext(connection) as captured:
            task_graph_create(group=personas.group, actor=personas.member, tasks=tasks)
        return len(captured)

    small, large = statements(20), statements(2000)

    assert small == large <= 12, (small, large)


def test_a_body_over_the_global_bound_is_taken_up_to_the_graphs_own(personas):
    tasks = [{"key": f"t{i}", "title": "T", "instructions": "x" * 10_000} for i in range(300)]

    accepted = post_graph(personas.member, tasks)
    with override_settings(CLAW_TASK_GRAPH_MAX_BYTES=2_500_000):
        refused = post_graph(personas.member, tasks)

    assert accepted.status_code == 201, accepted.content[:500]  # 3 MB > 2 MiB
    assert_error(refused, 413, "too_large")
    assert Task.objects.count() == 300
