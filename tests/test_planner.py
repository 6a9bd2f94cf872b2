"""The planner: a goal task → a plan checkpoint → a task graph. The model is the scripted
OpenAI-compatible server (tests/llm_server.py) in its own process, reached through the real
openai SDK (claw.llm) with CLAW_LLM_BASE_URL pointed at it."""

import json

import pytest
from django.test import override_settings

from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointSource
from apps.checkpoints.services import checkpoint_raise
from apps.events.models import Event
from apps.groups.models import Group
from apps.llm.models import ModelCall
from apps.tasks.models import Task, TaskStatus
from apps.tasks.planner import plan_generate, plan_validate
from apps.tasks.services import task_create
from claw.errors import InvalidInput
from tests.llm_server import LLMServer
from tests.test_api_support import assert_error, body, client_for, send


@pytest.fixture(scope="module")
def model():
    server = LLMServer()
    yield server
    server.close()


@pytest.fixture
def llm(model, settings):
    model.reset()
    settings.CLAW_LLM_BASE_URL = model.base_url
    settings.CLAW_LLM_API_KEY = "test-key"
    settings.CLAW_LLM_MODEL = "kimi-k2.6"
    settings.CLAW_LLM_MAX_RETRIES = 0
    return model


@pytest.fixture
def run_planner(monkeypatch, django_capture_on_commit_callbacks):
    """plan_task runs at once, in this process, when the request commits."""
    ran = []

    def delay(task_id, request_id):
        ran.append(plan_generate(task_id=task_id, request_id=request_id))

    monkeypatch.setattr("apps.tasks.tasks.plan_task.delay", delay)
    return ran


@pytest.fixture
def goal(personas):
    return task_create(
        group=personas.group,
        actor=personas.member,
        title="Publish a benchmark report",
        instructions="Measure our API latency and write it up.",
        required_toolkits=["shell"],
    )


PLAN = {
    "summary": "Measure, then write.",
    "tasks": [
        {
            "key": "measure",
            "title": "Measure latency",
            "instructions": "Run the load test.",
            "required_toolkits": ["shell"],
            "depends_on": [],
            "acceptance_criteria": ["p50 and p99 recorded"],
        },
        {
            "key": "chart",
            "title": "Chart the numbers",
            "instructions": "Plot them.",
            "required_toolkits": ["python"],
            "depends_on": ["measure"],
            "acceptance_criteria": [],
        },
        {
            "key": "write",
            "title": "Write the report",
            "instructions": "Summarize the findings.",
            "required_toolkits": ["llm"],
            "depends_on": ["measure", "chart"],
            "acceptance_criteria": ["under 2 pages", "names the p99"],
        },
    ],
}


def answer(plan) -> dict:
    return {"content": json.dumps(plan), "reasoning_content": "Let me think about it."}


def request_plan(django_capture_on_commit_callbacks, user, task):
    with django_capture_on_commit_callbacks(execute=True):
        return send(client_for(user), "POST", f"/tasks/{task.id}/plan")


def events(task, kind):
    return list(Event.objects.filter(task=task, kind=kind).order_by("seq"))


def test_a_valid_plan_is_raised_as_a_plan_checkpoint(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script(answer(PLAN))

    response = request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    assert response.status_code == 202, response.content
    [requested] = events(goal, "plan.requested")
    assert body(response) == {"task_id": goal.id, "request_id": requested.id, "status": "requested"}
    assert run_planner == ["proposed"]
    checkpoint = Checkpoint.objects.get(task=goal)
    assert checkpoint.kind == CheckpointKind.PLAN and checkpoint.source == CheckpointSource.PLANNER
    assert [t["key"] for t in checkpoint.proposal["tasks"]] == ["measure", "chart", "write"]
    assert checkpoint.proposal["tasks"][2]["depends_on"] == ["measure", "chart"]
    assert checkpoint.details == "Measure, then write."
    [proposed] = events(goal, "plan.proposed")
    assert proposed.payload["checkpoint_id"] == checkpoint.id
    assert proposed.payload["request_id"] == requested.id
    # What the model was asked: a streamed chat with the plan's JSON schema, whose toolkits
    # are the ones the group's agents declare, plus llm.
    [sent] = llm.requests()
    assert sent["model"] == "kimi-k2.6" and sent["stream"] is True
    schema = sent["response_format"]["json_schema"]["schema"]
    assert sent["response_format"]["type"] == "json_schema"
    toolkits = schema["properties"]["tasks"]["items"]["properties"]["required_toolkits"]
    assert toolkits["items"]["enum"] == ["llm", "python", "shell"]
    assert "Publish a benchmark report" in sent["messages"][1]["content"]
    # The proposal is shown with the checkpoint.
    shown = body(send(client_for(personas.viewer), "GET", f"/checkpoints/{checkpoint.id}"))
    assert shown["proposal"] == checkpoint.proposal and shown["kind"] == "plan"


def test_an_invalid_plan_is_retried_once_with_the_error(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    broken = json.loads(json.dumps(PLAN))
    broken["tasks"][1]["depends_on"] = ["measurement"]
    llm.script({"content": json.dumps(broken)}, answer(PLAN))

    request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    assert run_planner == ["proposed"]
    first, second = llm.requests()
    assert len(second["messages"]) == len(first["messages"]) + 2
    assert second["messages"][-2] == {"role": "assistant", "content": json.dumps(broken)}
    retry = second["messages"][-1]["content"]
    assert "invalid" in retry and "'measurement'" in retry
    assert Checkpoint.objects.get(task=goal).proposal["tasks"][1]["depends_on"] == ["measure"]


def test_two_invalid_plans_end_in_plan_failed(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script({"content": "Sure! Here is the plan: step 1..."}, {"content": ""})

    request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    assert run_planner == ["failed"]
    assert len(llm.requests()) == 2
    assert not Checkpoint.objects.filter(task=goal).exists()
    [failed] = events(goal, "plan.failed")
    assert "empty" in failed.payload["error"]
    assert events(goal, "plan.proposed") == []


def test_a_model_error_ends_in_plan_failed(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script({"status": 500, "error": "overloaded"})

    request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    assert run_planner == ["failed"]
    [failed] = events(goal, "plan.failed")
    assert "model call failed" in failed.payload["error"]


def test_a_model_using_an_undeclared_toolkit_is_corrected(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    browsing = json.loads(json.dumps(PLAN))
    browsing["tasks"][0]["required_toolkits"] = ["browser"]  # known, but no agent has it
    llm.script({"content": json.dumps(browsing)}, {"content": json.dumps(browsing)})

    request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    assert run_planner == ["failed"]
    [failed] = events(goal, "plan.failed")
    assert "unknown toolkit(s) browser" in failed.payload["error"]


def test_planning_is_charged_to_the_groups_budget_and_refused_when_it_is_used_up(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    broken = json.loads(json.dumps(PLAN))
    broken["tasks"][1]["depends_on"] = ["measurement"]
    llm.script(
        {"content": json.dumps(broken), "usage": {"prompt_tokens": 900, "completion_tokens": 100}},
        {**answer(PLAN), "usage": {"prompt_tokens": 1000, "completion_tokens": 200}},
    )
    Group.objects.filter(id=personas.group.id).update(llm_token_budget=2000)

    request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    # Both calls (the invalid answer and its correction) count, as agents' calls do.
    assert run_planner == ["proposed"]
    calls = ModelCall.objects.filter(group=personas.group, task=goal).order_by("id")
    assert [(c.prompt_tokens, c.completion_tokens, c.device_id) for c in calls] == [
        (900, 100, None),
        (1000, 200, None),
    ]
    assert all(c.latency_ms >= 0 and c.model == "kimi-k2.6" for c in calls)
    personas.group.refresh_from_db()
    assert personas.group.llm_tokens_used == 2200
    assert Event.objects.filter(group=personas.group, kind="llm.call").count() == 2
    assert Checkpoint.objects.filter(group=personas.group, kind=CheckpointKind.BUDGET).count() == 1

    # Over budget, the next plan is refused without asking the model.
    other = task_create(group=personas.group, actor=personas.member, title="Another goal")
    request_plan(django_capture_on_commit_callbacks, personas.member, other)

    assert run_planner == ["proposed", "failed"]
    assert len(llm.requests()) == 2
    [failed] = events(other, "plan.failed")
    assert "budget is used up (2,200 of 2,000 tokens)" in failed.payload["error"]
    assert Checkpoint.objects.filter(group=personas.group, kind=CheckpointKind.BUDGET).count() == 1


def test_a_request_is_made_once(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script(answer(PLAN))
    request_plan(django_capture_on_commit_callbacks, personas.member, goal)
    [requested] = events(goal, "plan.requested")

    again = plan_generate(task_id=goal.id, request_id=requested.id)
    pending = request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    assert again == "skipped"
    assert len(llm.requests()) == 1
    assert Checkpoint.objects.filter(task=goal).count() == 1
    assert_error(pending, 409, "plan_pending")


def test_approving_a_plan_creates_the_graph(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script(answer(PLAN))
    request_plan(django_capture_on_commit_callbacks, personas.member, goal)
    checkpoint = Checkpoint.objects.get(task=goal)

    response = send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve"},
    )

    assert response.status_code == 200, response.content
    children = {t.title: t for t in Task.objects.filter(parent=goal)}
    assert set(children) == {"Measure latency", "Chart the numbers", "Write the report"}
    measure, chart, write = (
        children["Measure latency"],
        children["Chart the numbers"],
        children["Write the report"],
    )
    assert measure.status == TaskStatus.READY and measure.required_toolkits == ["shell"]
    assert chart.status == TaskStatus.WAITING
    assert set(chart.dependencies.values_list("id", flat=True)) == {measure.id}
    assert set(write.dependencies.values_list("id", flat=True)) == {measure.id, chart.id}
    assert write.required_toolkits == ["llm"]
    assert write.instructions.endswith("Acceptance criteria:\n- under 2 pages\n- names the p99")
    assert all(t.root_id == goal.id for t in children.values())
    # The goal waits for the plan's last task.
    goal.refresh_from_db()
    assert goal.status == TaskStatus.WAITING
    assert list(goal.dependencies.values_list("id", flat=True)) == [write.id]
    [applied] = events(goal, "plan.applied")
    assert applied.payload["tasks"] == {"measure": measure.id, "chart": chart.id, "write": write.id}


def test_approval_creates_the_plan_as_one_task_graph(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks, monkeypatch
):
    from apps.tasks import graphs

    graphs_made = []
    create = graphs.task_graph_create

    def recording(**kwargs):
        graphs_made.append([(t.key, t.depends_on, t.parent_id) for t in kwargs["tasks"]])
        return create(**kwargs)

    monkeypatch.setattr(graphs, "task_graph_create", recording)
    llm.script(answer(PLAN))
    request_plan(django_capture_on_commit_callbacks, personas.member, goal)
    checkpoint = Checkpoint.objects.get(task=goal)
    start = Group.objects.get(id=personas.group.id).event_seq

    send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve"},
    )

    assert graphs_made == [
        [
            ("measure", [], goal.id),
            ("chart", ["measure"], goal.id),
            ("write", ["measure", "chart"], goal.id),
        ]
    ]
    created = Event.objects.filter(group=personas.group, seq__gt=start, kind="task.created")
    seqs = sorted(created.values_list("seq", flat=True))
    assert len(seqs) == 3 and seqs == list(range(seqs[0], seqs[0] + 3))
    assert set(created.values_list("actor_id", flat=True)) == {personas.approver.id}


def test_rejecting_a_plan_creates_nothing(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script(answer(PLAN))
    request_plan(django_capture_on_commit_callbacks, personas.member, goal)
    checkpoint = Checkpoint.objects.get(task=goal)

    send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "reject"},
    )

    assert not Task.objects.filter(parent=goal).exists()
    goal.refresh_from_db()
    assert goal.status == TaskStatus.READY


def test_changes_requested_ask_the_planner_again_with_the_note(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    smaller = {"summary": "Just write.", "tasks": [PLAN["tasks"][2] | {"depends_on": []}]}
    llm.script(answer(PLAN), answer(smaller))
    request_plan(django_capture_on_commit_callbacks, personas.member, goal)
    first = Checkpoint.objects.get(task=goal)

    with django_capture_on_commit_callbacks(execute=True):
        send(
            client_for(personas.approver),
            "POST",
            f"/checkpoints/{first.id}/decide",
            {"verdict": "request_changes", "note": "No charts, please."},
        )

    assert run_planner == ["proposed", "proposed"]
    prompt = llm.requests()[1]["messages"][1]["content"]
    assert "No charts, please." in prompt and "Chart the numbers" in prompt
    second = Checkpoint.objects.filter(task=goal).exclude(id=first.id).get()
    assert [t["key"] for t in second.proposal["tasks"]] == ["write"]


def test_editing_a_plan_revalidates_it(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script(answer(PLAN))
    request_plan(django_capture_on_commit_callbacks, personas.member, goal)
    checkpoint = Checkpoint.objects.get(task=goal)
    path = f"/checkpoints/{checkpoint.id}/proposal"
    member = client_for(personas.member)
    cyclic = json.loads(json.dumps(PLAN))
    cyclic["tasks"][0]["depends_on"] = ["write"]
    unknown = json.loads(json.dumps(PLAN))
    unknown["tasks"][0]["required_toolkits"] = ["teleport"]
    edited = {
        "summary": "One step.",
        "tasks": [
            {"title": "Do it all", "instructions": "Everything.", "required_toolkits": ["llm"]},
            {"title": "Check it", "depends_on": [0]},
        ],
    }

    cycle = send(member, "PUT", path, {"proposal": cyclic})
    teleport = send(member, "PUT", path, {"proposal": unknown})
    by_viewer = send(client_for(personas.viewer), "PUT", path, {"proposal": edited})
    ok = send(member, "PUT", path, {"proposal": edited})

    assert_error(cycle, 422, "dependency_cycle")
    assert_error(teleport, 422, "unknown_toolkit")
    assert_error(by_viewer, 403, "forbidden")
    other = checkpoint_raise(group=personas.group, title="Ship it?", source="human", task=goal)
    not_a_plan = send(member, "PUT", f"/checkpoints/{other.id}/proposal", {"proposal": edited})
    assert_error(not_a_plan, 422, "not_a_plan")
    assert ok.status_code == 200, ok.content
    proposal = body(ok)["proposal"]
    assert [t["key"] for t in proposal["tasks"]] == ["t1", "t2"]
    assert proposal["tasks"][1]["depends_on"] == ["t1"]
    assert body(ok)["details"] == "One step."
    assert len(events(goal, "plan.edited")) == 1
    # Approval creates the edited plan.
    send(client_for(personas.approver), "POST", f"/checkpoints/{checkpoint.id}/decide",
         {"verdict": "approve"})  # fmt: skip
    assert sorted(Task.objects.filter(parent=goal).values_list("title", flat=True)) == [
        "Check it",
        "Do it all",
    ]
    late = send(member, "PUT", path, {"proposal": edited})
    assert_error(late, 409, "already_resolved")


def test_a_plan_someone_decided_on_can_no_longer_be_edited(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    personas.group.checkpoint_required_approvals = 2  # the first approval leaves it pending
    personas.group.save(update_fields=["checkpoint_required_approvals"])
    llm.script(answer(PLAN))
    request_plan(django_capture_on_commit_callbacks, personas.member, goal)
    checkpoint = Checkpoint.objects.get(task=goal)
    path = f"/checkpoints/{checkpoint.id}/decide"
    approved = send(client_for(personas.approver), "POST", path, {"verdict": "approve"})
    assert approved.status_code == 200, approved.content

    edit = send(
        client_for(personas.member),
        "PUT",
        f"/checkpoints/{checkpoint.id}/proposal",
        {"proposal": {"summary": "Other.", "tasks": [{"title": "Something else"}]}},
    )

    assert_error(edit, 409, "plan_decided")
    checkpoint.refresh_from_db()
    assert checkpoint.status == "pending" and checkpoint.proposal["tasks"][0]["key"] == "measure"


def test_plan_validation_refuses_cycles_unknown_toolkits_and_big_plans():
    def task(key, deps=(), toolkits=("llm",)):
        return {
            "key": key,
            "title": key,
            "depends_on": list(deps),
            "required_toolkits": list(toolkits),
        }

    with pytest.raises(InvalidInput) as cycle:
        plan_validate(
            {"tasks": [task("a", ["c"]), task("b", ["a"]), task("c", ["b"]), task("d")]},
            toolkits={"llm"},
        )
    with pytest.raises(InvalidInput) as itself:
        plan_validate({"tasks": [task("a", ["a"])]}, toolkits={"llm"})
    with pytest.raises(InvalidInput) as unknown:
        plan_validate({"tasks": [task("a", toolkits=["shell"])]}, toolkits={"llm"})
    with pytest.raises(InvalidInput) as big:
        plan_validate({"tasks": [task(f"t{i}") for i in range(51)]}, toolkits={"llm"})
    with pytest.raises(InvalidInput) as untitled:
        plan_validate({"tasks": [{"title": "  "}]}, toolkits={"llm"})
    with pytest.raises(InvalidInput) as twice:
        plan_validate({"tasks": [task("a"), task("A")]}, toolkits={"llm"})

    assert cycle.value.code == "dependency_cycle" and "a, b, c" in cycle.value.message
    assert itself.value.code == "dependency_cycle"
    assert unknown.value.code == "unknown_toolkit"
    assert big.value.code == "invalid_plan" and "at most 50" in big.value.message
    assert "title must not be empty" in untitled.value.message
    assert "used twice" in twice.value.message
    assert len(plan_validate({"tasks": [task(f"t{i}") for i in range(50)]}, toolkits={"llm"})[
        "tasks"
    ]) == 50  # fmt: skip


def test_a_viewer_cannot_plan(personas, goal, llm, run_planner, django_capture_on_commit_callbacks):
    response = request_plan(django_capture_on_commit_callbacks, personas.viewer, goal)
    outsider = request_plan(django_capture_on_commit_callbacks, personas.outsider, goal)

    assert_error(response, 403, "forbidden")
    assert_error(outsider, 404, "not_found")
    assert run_planner == [] and llm.requests() == []


@override_settings(CLAW_LLM_BASE_URL="")
def test_without_a_model_planning_is_unavailable(
    personas, goal, run_planner, django_capture_on_commit_callbacks
):
    response = request_plan(django_capture_on_commit_callbacks, personas.member, goal)

    assert_error(response, 503, "model_unavailable")
    assert events(goal, "plan.requested") == []


def test_the_task_page_offers_planning_and_its_button_requests_a_plan(
    personas, goal, llm, run_planner, django_capture_on_commit_callbacks
):
    llm.script(answer(PLAN))
    page = f"/g/research/tasks/{goal.id}/"
    member, viewer = client_for(personas.member), client_for(personas.viewer)

    shown = member.get(page).content.decode()
    hidden = viewer.get(page).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = member.post(f"{page}plan/", {"next": page})

    assert "Plan with K2.6" in shown and "Plan with K2.6" not in hidden
    assert response.status_code == 302 and response["Location"] == page
    assert run_planner == ["proposed"]
    assert Checkpoint.objects.filter(task=goal, kind=CheckpointKind.PLAN).exists()
