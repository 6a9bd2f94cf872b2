"""The device runtime's model loop (claw.device.llm), run by AttemptRunner for tasks without
steps, against the scripted OpenAI-compatible server (tests/llm_server.py) through the real
openai SDK. The agent connection is a scripted session; no Django here."""

import asyncio
import json
import time

import pytest

from claw import protocol
from claw.device.llm import LLMSettings, LLMToolkit
from claw.device.runner import NO_MODEL, AttemptRunner, Journal, check_task
from claw.device.toolkits import builtin_toolkits
from tests.llm_server import LLMServer


@pytest.fixture(scope="module")
def model():
    server = LLMServer()
    yield server
    server.close()


@pytest.fixture
def llm(model):
    model.reset()
    return model


class Session:
    """Answers frames like a server that accepts everything; records them."""

    def __init__(self, decisions=()):
        self.frames: list[tuple[str, dict]] = []
        self.decisions = list(decisions)
        self.confirmed: list[int] = []

    async def request(self, frame_model, **fields):
        kind = frame_model.model_fields["type"].annotation.__args__[0]
        frame = frame_model(type=kind, id="x-1", **fields)
        protocol.parse_client_frame(frame.model_dump_json())  # what the server would accept
        self.frames.append((kind, fields))
        if kind == "checkpoint_request":
            return {"checkpoint_id": 40 + len(self.frames)}
        return {"task_status": "ready"} if kind == "fail" else {}

    async def wait_decision(self, checkpoint_id):
        status, note = self.decisions.pop(0)
        return protocol.Decision(
            checkpoint_id=checkpoint_id, attempt_id=5, status=status, note=note
        )

    async def confirm_decision(self, checkpoint_id):
        self.confirmed.append(checkpoint_id)

    def of(self, kind):
        return [fields for k, fields in self.frames if k == kind]


def toolkit(model, **overrides):
    return LLMToolkit(
        LLMSettings(base_url=model.base_url, api_key="clawd_test", model="kimi-k2.6", **overrides)
    )


def task(instructions="Write hello into hello.txt.", feedback=None, steps=(), skills=None):
    return protocol.TaskSpec(
        id=7,
        title="Say hello",
        instructions=instructions,
        steps=list(steps),
        required_toolkits=["llm", "files"],
        parent_id=3,
        root_id=3,
        feedback=feedback,
        skills=skills or {},
    )


def run(model, session, tmp_path, *, spec=None, journal=None, **settings):
    kits = {**builtin_toolkits(["files", "shell"]), "llm": toolkit(model, **settings)}
    runner = AttemptRunner(
        protocol.Assignment(
            attempt_id=5,
            epoch=2,
            status="offered",
            deadline="2030-01-01T00:00:00Z",
            task=spec or task(),
        ),
        session=session,
        toolkits=kits,
        workdir=tmp_path,
        journal=journal,
    )
    return asyncio.run(runner.run())


def call(name, arguments, **extra):
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"name": name, "arguments": args, **extra}


DONE = {"tool_calls": [call("report_done", {"result": "hello.txt says hello"})]}


def test_a_tool_call_runs_its_toolkit_and_the_result_goes_back_under_the_same_id(llm, tmp_path):
    llm.script(
        {
            "reasoning_content": "I should write the file.",
            "content": "Writing it.",
            "tool_calls": [call("files__write", {"path": "hello.txt", "content": "hello"})],
        },
        DONE,
    )
    session = Session()

    outcome = run(llm, session, tmp_path)

    assert outcome == "succeeded"
    assert (tmp_path / "hello.txt").read_text() == "hello"
    first, second = llm.requests()
    # Tools: the toolkits' tools (no dots in names) and the platform tools; no artifact tool
    # without a server to upload to.
    names = {tool["function"]["name"] for tool in first["tools"]}
    assert {"files__write", "files__read", "shell__run", "report_done"} <= names
    assert {"report_failure", "request_checkpoint"} <= names and "write_artifact" not in names
    assert first["stream"] is True and first["model"] == "kimi-k2.6"
    assert "Say hello" in first["messages"][1]["content"]
    # The assistant turn is echoed with its reasoning and its Kimi-style call id, and the
    # tool result answers that exact id.
    assistant, result = second["messages"][2], second["messages"][3]
    assert assistant["reasoning_content"] == "I should write the file."
    assert assistant["tool_calls"][0]["id"] == "functions.files__write:0"
    assert result["role"] == "tool" and result["tool_call_id"] == "functions.files__write:0"
    assert json.loads(result["content"])["bytes"] == 5
    # The gateway learns which attempt each call is for.
    assert all(h["x-claw-attempt"] == "5" and h["x-claw-epoch"] == "2" for h in llm.headers())
    assert all(h["authorization"] == "Bearer clawd_test" for h in llm.headers())
    # Progress: each turn (log) and each tool call (tool_call), then complete.
    kinds = [(k, f.get("kind")) for k, f in session.frames]
    assert kinds == [
        ("accept", None),
        ("progress", "log"),
        ("progress", "tool_call"),
        ("progress", "log"),
        ("progress", "tool_call"),
        ("complete", None),
    ]
    turn, tool_call = session.of("progress")[:2]
    assert turn["data"]["reasoning"] == "I should write the file."
    assert turn["data"]["tool_calls"] == ["files__write"]
    assert tool_call["data"]["tool"] == "files.write" and tool_call["data"]["ok"] is True
    assert [f["seq"] for f in session.of("progress")] == [1, 2, 3, 4]
    [complete] = session.of("complete")
    assert complete["result"]["result"] == "hello.txt says hello"
    assert complete["result"]["turns"] == 2 and complete["result"]["usage"]["prompt_tokens"] > 0


def test_the_groups_skills_for_the_tasks_toolkits_are_in_the_system_prompt(llm, tmp_path):
    skills = {"files": "### Procedure\n1. Write files as UTF-8.", "llm": "Answer in English."}
    llm.script(DONE)

    assert run(llm, Session(), tmp_path, spec=task(skills=skills)) == "succeeded"

    system = llm.requests()[0]["messages"][0]["content"]
    assert system.index("# Skills") < system.index("## Skill: files")
    assert "## Skill: files\n\n### Procedure\n1. Write files as UTF-8." in system
    assert "## Skill: llm\n\nAnswer in English." in system


def test_without_skills_the_system_prompt_has_no_skills_section(llm, tmp_path):
    llm.script(DONE)

    assert run(llm, Session(), tmp_path) == "succeeded"

    assert "# Skills" not in llm.requests()[0]["messages"][0]["content"]


def test_malformed_arguments_and_unknown_tools_come_back_as_errors(llm, tmp_path):
    llm.script(
        {
            "tool_calls": [
                call("files__write", '{"path": "a.txt", "content": '),
                call("teleport", {}),
                call("files.list", {}),  # the dotted name works too
            ]
        },
        DONE,
    )
    session = Session()

    assert run(llm, session, tmp_path) == "succeeded"
    messages = llm.requests()[1]["messages"]
    broken, unknown, listed = messages[3:6]
    assert broken["tool_call_id"] == "functions.files__write:0"
    assert "not valid JSON" in json.loads(broken["content"])["error"]
    assert "no tool 'teleport'" in json.loads(unknown["content"])["error"]
    assert "entries" in json.loads(listed["content"])
    oks = [f["data"]["ok"] for f in session.of("progress") if f["kind"] == "tool_call"]
    assert oks == [False, False, True, True]


def test_bad_platform_tool_arguments_come_back_as_errors_and_change_nothing(llm, tmp_path):
    bad = [
        call("report_done", {}),
        call("report_done", {"result": 5}),
        call("report_failure", {"error": "  "}),
        call("request_checkpoint", {"title": "Ship?", "options": [1, 2]}),
        call("request_checkpoint", {"options": ["yes"]}),
        call("write_artifact", {"name": "", "content": "x"}),
        call("write_artifact", {"name": "n" * 201, "content": "x"}),
        call("write_artifact", {"name": "notes.md", "content": {"not": "text"}}),
    ]
    llm.script({"tool_calls": bad}, DONE)
    session = Session()

    # No server answers on port 9: an artifact call that got past validation would fail
    # differently ("the upload failed").
    assert run(llm, session, tmp_path, server="http://127.0.0.1:9", token="clawd_x") == (
        "succeeded"
    )
    errors = [
        json.loads(m["content"])["error"]
        for m in llm.requests()[1]["messages"]
        if m["role"] == "tool"
    ]
    assert errors == [
        "report_done needs result: a non-empty string",
        "report_done needs result: a non-empty string",
        "report_failure needs error: a non-empty string",
        "options must be a list of strings",
        "request_checkpoint needs title: a non-empty string",
        "name must be a string of 1 to 200 characters",
        "name must be a string of 1 to 200 characters",
        "content must be a string",
    ]
    # Nothing reached the server but the progress and the one real report.
    assert {kind for kind, _ in session.frames} == {"accept", "progress", "complete"}
    [complete] = session.of("complete")
    assert complete["result"]["result"] == "hello.txt says hello"


def test_a_failing_tool_is_reported_to_the_model_not_the_server(llm, tmp_path):
    llm.script({"tool_calls": [call("shell__run", {"cmd": "exit 3"})]}, DONE)
    session = Session()

    assert run(llm, session, tmp_path) == "succeeded"
    error = json.loads(json.loads(llm.requests()[1]["messages"][3]["content"])["error"])
    assert error["error"].startswith("exit code 3") and error["output"]["exit_code"] == 3


def test_an_empty_reply_after_reasoning_gets_one_nudge(llm, tmp_path):
    llm.script({"reasoning_content": "Hmm, let me think... done thinking.", "content": ""}, DONE)
    session = Session()

    assert run(llm, session, tmp_path) == "succeeded"
    nudge = llm.requests()[1]["messages"][-1]
    assert nudge["role"] == "user" and "no answer and no tool call" in nudge["content"]


def test_two_empty_replies_fail_the_attempt_retryably(llm, tmp_path):
    llm.script({"reasoning_content": "Thinking."}, {"reasoning_content": "Still thinking."})
    session = Session()

    assert run(llm, session, tmp_path) == "failed"
    [fail] = session.of("fail")
    assert fail["retryable"] is True and "without a result" in fail["error"]
    assert len(llm.requests()) == 2


def test_a_plain_answer_is_nudged_then_taken_as_the_result(llm, tmp_path):
    llm.script({"content": "The answer is 42."}, {"content": "The answer is 42, really."})
    session = Session()

    assert run(llm, session, tmp_path) == "succeeded"
    assert "report_done" in llm.requests()[1]["messages"][-1]["content"]
    [complete] = session.of("complete")
    assert complete["result"]["result"] == "The answer is 42, really."


def test_the_step_cap_stops_a_runaway_loop(llm, tmp_path):
    looping = {"tool_calls": [call("files__list", {})]}
    llm.script(*[looping] * 5)
    session = Session()

    assert run(llm, session, tmp_path, max_turns=3) == "failed"
    assert len(llm.requests()) == 3
    [fail] = session.of("fail")
    assert fail["retryable"] is False and "step cap" in fail["error"]


def test_report_failure_fails_the_attempt(llm, tmp_path):
    llm.script({"tool_calls": [call("report_failure", {"error": "no network", "retryable": True})]})
    session = Session()

    assert run(llm, session, tmp_path) == "failed"
    [fail] = session.of("fail")
    assert fail == {"attempt_id": 5, "epoch": 2, "error": "no network", "retryable": True}
    # The call's progress went out before the attempt ended.
    assert [k for k, _ in session.frames][-2:] == ["progress", "fail"]


def test_a_checkpoint_waits_for_the_decision_and_returns_requested_changes(llm, tmp_path):
    ask = {"tool_calls": [call("request_checkpoint", {"title": "Send it?", "options": ["yes"]})]}
    llm.script(ask, ask, DONE)
    session = Session(decisions=[("changes_requested", "Say it louder."), ("approved", "")])

    assert run(llm, session, tmp_path) == "succeeded"
    [first, _] = session.of("checkpoint_request")
    assert first["title"] == "Send it?" and first["options"] == ["yes"]
    requests = llm.requests()
    changes = json.loads(requests[1]["messages"][-1]["content"])
    assert changes["status"] == "changes_requested" and changes["note"] == "Say it louder."
    approved = json.loads(requests[2]["messages"][-1]["content"])
    assert approved["status"] == "approved"
    assert len(session.confirmed) == 2
    [complete] = session.of("complete")
    assert complete["result"]["feedback"] == "Say it louder."


def test_a_rejected_checkpoint_fails_the_attempt(llm, tmp_path):
    llm.script({"tool_calls": [call("request_checkpoint", {"title": "Delete prod?"})]})
    session = Session(decisions=[("rejected", "No.")])

    assert run(llm, session, tmp_path) == "failed"
    [fail] = session.of("fail")
    assert fail["error"] == "checkpoint rejected: No." and fail["retryable"] is False


class Waiting(Session):
    """A session whose decisions never come: the agent is killed while it waits."""

    async def wait_decision(self, checkpoint_id):
        self.waiting = checkpoint_id
        raise SystemExit  # kill -9: nothing after this runs, the journal stays as it was


def restarted_while_waiting(llm, tmp_path) -> tuple[Journal, int]:
    llm.script({"tool_calls": [call("request_checkpoint", {"title": "Send it?"})]})
    journal = Journal(tmp_path / "state", 5)
    waiting = Waiting()
    with pytest.raises(SystemExit):
        run(llm, waiting, tmp_path, journal=journal)
    llm.reset()
    return journal, waiting.waiting


def test_a_restart_while_waiting_waits_for_the_same_checkpoint_and_tells_the_model(llm, tmp_path):
    journal, checkpoint_id = restarted_while_waiting(llm, tmp_path)
    llm.script(DONE)
    session = Session(decisions=[("changes_requested", "Say it louder.")])

    assert run(llm, session, tmp_path, journal=journal) == "succeeded"

    # No second checkpoint: the decision on the first one reached the new conversation.
    assert session.of("checkpoint_request") == [] and session.confirmed == [checkpoint_id]
    [sent] = llm.requests()
    prompt = sent["messages"][1]["content"]
    assert "'Send it?'" in prompt and f"checkpoint {checkpoint_id}" in prompt
    assert "changes_requested, with the note: Say it louder." in prompt
    [resumed, *_] = session.of("progress")
    assert resumed["data"]["resumed_checkpoint"]["status"] == "changes_requested"


def test_a_checkpoint_rejected_while_the_agent_was_down_fails_without_the_model(llm, tmp_path):
    journal, checkpoint_id = restarted_while_waiting(llm, tmp_path)
    session = Session(decisions=[("rejected", "No.")])

    assert run(llm, session, tmp_path, journal=journal) == "failed"

    assert llm.requests() == [] and session.confirmed == [checkpoint_id]
    [fail] = session.of("fail")
    assert fail["error"] == "checkpoint rejected: No."


def test_review_feedback_is_in_the_prompt(llm, tmp_path):
    llm.script(DONE)

    run(llm, Session(), tmp_path, spec=task(feedback="Use a capital H."))

    prompt = llm.requests()[0]["messages"][1]["content"]
    assert "Use a capital H." in prompt and "reviewer asked for changes" in prompt


def test_old_tool_outputs_are_shortened_to_fit_the_context_budget(llm, tmp_path):
    (tmp_path / "big.txt").write_text("x" * 20_000)
    read = {"tool_calls": [call("files__read", {"path": "big.txt"})]}
    llm.script(*[read] * 6, DONE)
    session = Session()

    assert run(llm, session, tmp_path, context_tokens=25_000, chars_per_token=4) == "succeeded"
    last = llm.requests()[-1]["messages"]
    outputs = [m["content"] for m in last if m["role"] == "tool"]
    assert len(outputs) == 6
    assert all("dropped to save context" in out for out in outputs[:2])
    assert all(len(out) > 20_000 for out in outputs[-4:])  # the recent ones stay whole


def test_a_conversation_that_cannot_fit_fails(llm, tmp_path):
    llm.script(DONE)
    session = Session()

    outcome = run(llm, session, tmp_path, spec=task("y" * 50_000), context_tokens=1_000)

    assert outcome == "failed"
    assert "context budget" in session.of("fail")[0]["error"] and llm.requests() == []


def test_a_model_error_fails_the_attempt_retryably(llm, tmp_path):
    llm.script({"status": 503, "error": "overloaded"})
    session = Session()

    assert run(llm, session, tmp_path, max_retries=0) == "failed"
    [fail] = session.of("fail")
    assert fail["retryable"] is True and "HTTP 503" in fail["error"]


def test_cancelling_the_attempt_stops_the_model_call(llm, tmp_path):
    llm.script({"hang": True})
    session = Session()
    kits = {"llm": toolkit(llm)}
    runner = AttemptRunner(
        protocol.Assignment(
            attempt_id=5, epoch=2, status="offered", deadline="2030-01-01T00:00:00Z", task=task()
        ),
        session=session,
        toolkits=kits,
        workdir=tmp_path,
    )

    async def main():
        running = asyncio.create_task(runner.run())
        while not llm.requests():
            await asyncio.sleep(0.05)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(main())
    assert [k for k, _ in session.frames] == ["accept"]


def test_tasks_without_steps_go_to_agents_with_the_model_loop(llm, tmp_path):
    plain = builtin_toolkits(["files"])
    with_model = {**plain, "llm": toolkit(llm)}

    assert check_task(task(), plain)[0] == "missing_tool"
    assert check_task(task(steps=[]), {**plain, "llm": object()}) == ("missing_tool", NO_MODEL)
    assert check_task(task(), with_model) is None
    # The llm toolkit has no step tools, and is declared like any other.
    assert with_model["llm"].schemas() == [] and with_model["llm"].version == "1.0"


def test_progress_numbering_survives_in_the_journal(llm, tmp_path):
    llm.script(DONE)
    journal = Journal(tmp_path / "state", 5)

    run(llm, Session(), tmp_path, journal=journal)

    assert journal.load(2)["next_seq"] == 3


# --- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory, model):
    """`claw up` in services mode (Daphne, a Celery worker, beat) on a dedicated database,
    its model backend the scripted server, so the planner and the gateway both use it."""
    from tests.live import BIN, dedicated_services, free_port, manage, running, wait_healthy
    from tests.test_device_e2e import SETUP, Server

    with dedicated_services("llm", tmp_path_factory.mktemp("llm")) as services:
        output = manage(services, "shell", "-v", "0", "-c", SETUP)
        server = Server(services, json.loads(output.strip().splitlines()[-1]))
        server.env["CLAW_LLM_BASE_URL"] = model.base_url
        server.env["CLAW_LLM_MAX_RETRIES"] = "0"
        server.port = free_port()
        server.base = f"http://127.0.0.1:{server.port}"
        command = [str(BIN / "claw"), "up", "--port", str(server.port)]
        with running("claw up", command, server.env) as claw:
            server.procs.append(claw)
            wait_healthy(server.base, 60, claw)
            yield server


def _pending(server, kind: str, timeout: float, *procs) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, page = server.api("GET", "/groups/devs/checkpoints?status=pending")
        assert status == 200, page
        for checkpoint in page["items"]:
            if checkpoint["kind"] == kind:
                return checkpoint
        time.sleep(0.2)
    raise AssertionError(f"no pending {kind} checkpoint\n" + "\n".join(p.output() for p in procs))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_goal_is_planned_approved_and_run_by_two_model_agents(platform, model, tmp_path):
    from tests.test_device_e2e import TERMINAL, agent, connected, pair

    server = platform
    model.reset()
    plan = {
        "summary": "Draft, then check.",
        "tasks": [
            {
                "key": "draft",
                "title": "Draft the note",
                "instructions": "Write draft.md.",
                "required_toolkits": ["llm", "files"],
                "depends_on": [],
                "acceptance_criteria": ["draft.md exists"],
            },
            {
                "key": "check",
                "title": "Check the note",
                "instructions": "Check it with the shell.",
                "required_toolkits": ["llm", "shell"],
                "depends_on": ["draft"],
                "acceptance_criteria": [],
            },
        ],
    }
    model.script(
        {"content": json.dumps(plan)},
        # The writer: asks first, then writes the file and saves it as an artifact.
        {"tool_calls": [call("request_checkpoint", {"title": "Write the draft?"})]},
        {
            "reasoning_content": "Approved; writing.",
            "tool_calls": [
                call("files__write", {"path": "draft.md", "content": "# Note"}),
                call("write_artifact", {"name": "draft.md", "content": "# Note"}),
            ],
        },
        {"tool_calls": [call("report_done", {"result": "drafted"})]},
        # The checker.
        {"tool_calls": [call("shell__run", {"cmd": "echo checked"})]},
        {"tool_calls": [call("report_done", {"result": "checked"})]},
        # The goal itself, once its plan is done.
        {"tool_calls": [call("report_done", {"result": "the note is drafted and checked"})]},
    )
    writer_config, checker_config = tmp_path / "w.json", tmp_path / "c.json"
    pair(server, writer_config, "writer-box")
    pair(server, checker_config, "checker-box")
    llm_args = ("--llm",)
    with (
        agent(writer_config, "writer", "files", extra=(*llm_args, "--workdir", str(tmp_path / "w")))
        as writer,
        agent(checker_config, "checker", "shell", extra=llm_args) as checker,
    ):  # fmt: skip
        connected(writer)
        connected(checker)
        procs = (writer, checker, server.procs[-1])
        goal = server.create_task(
            "Publish a note",
            instructions="Draft a note and check it.",
            required_toolkits=["llm"],
            checkpoint_policy="before_start",
        )
        status, requested = server.api("POST", f"/tasks/{goal}/plan")
        assert status == 202, requested

        proposal = _pending(server, "plan", 60, *procs)
        assert [t["key"] for t in proposal["proposal"]["tasks"]] == ["draft", "check"]
        for checkpoint in (proposal, _pending(server, "before_start", 10, *procs)):
            status, decided = server.api(
                "POST", f"/checkpoints/{checkpoint['id']}/decide", {"verdict": "approve"}
            )
            assert status == 200, decided
        _, children = server.api("GET", f"/groups/devs/tasks?parent={goal}")
        ids = {t["title"]: t["id"] for t in children["items"]}
        assert set(ids) == {"Draft the note", "Check the note"}

        asked = _pending(server, "request", 60, *procs)
        assert asked["title"] == "Write the draft?"
        status, _ = server.api("POST", f"/checkpoints/{asked['id']}/decide", {"verdict": "approve"})
        assert status == 200

        done = server.wait_task(goal, TERMINAL, 90, *procs)
        assert done["status"] == "succeeded", done
        assert done["result"]["result"] == "the note is drafted and checked"
        draft = server.task(ids["Draft the note"])
        check = server.task(ids["Check the note"])
        assert draft["status"] == check["status"] == "succeeded"
        assert draft["attempts"][0]["agent"]["name"] == "writer"
        assert check["attempts"][0]["agent"]["name"] == "checker"
        assert (tmp_path / "w" / "draft.md").read_text() == "# Note"
        status, artifacts = server.api("GET", f"/tasks/{ids['Draft the note']}/artifacts")
        assert [a["name"] for a in artifacts] == ["draft.md"], writer.output()
        kinds = [e["kind"] for e in server.events(ids["Draft the note"])]
        assert "progress.tool_call" in kinds and "progress.log" in kinds
    # The planner's call and six agent turns, all through the server: the agents' calls went
    # through the gateway, so the backend never saw a device token.
    assert len(model.requests()) == 7
    assert not any("clawd_" in h.get("authorization", "") for h in model.headers())
