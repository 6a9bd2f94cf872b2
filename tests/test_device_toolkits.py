"""The device runtime's pieces without a server: built-in toolkits (timeouts, output caps,
workdir confinement, URL schemes), tool naming, the config file, backoff, and the step
runner against a scripted session."""

import asyncio
import http.server
import json
import os
import stat
import subprocess
import threading
import time

import pytest

from claw import protocol
from claw.device.client import Backoff, FrameIds
from claw.device.config import (
    ConfigError,
    DeviceConfig,
    load_config,
    normalize_server,
    save_config,
    ws_url,
)
from claw.device.runner import NO_MODEL, AttemptRunner, FrameRejected, Journal, check_task
from claw.device.toolkits import (
    OUTPUT_CAP,
    ToolContext,
    ToolError,
    builtin_toolkits,
    load_toolkits,
    resolve_tool,
)
from tests.live import PYTHON, ROOT, child_env

TOOLKITS = builtin_toolkits()


@pytest.fixture
def ctx(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    return ToolContext(workdir=workdir, task_id=1, attempt_id=1, epoch=1)


def run(slug_tool: str, args: dict, ctx: ToolContext) -> dict:
    toolkit, tool = resolve_tool(TOOLKITS, slug_tool)
    return asyncio.run(toolkit.run(tool, args, ctx))


def test_importing_the_device_runtime_does_not_import_django():
    code = (
        "import sys, claw.device, claw.device.cli, claw.device.__main__, claw.device.client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'celery', 'apps'))\n"
        "print(bad)\n"
        "assert not bad, bad"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- shell and python --------------------------------------------------------------------


def test_shell_runs_in_the_workdir_and_reports_exit_code_and_output(ctx):
    (ctx.workdir / "here.txt").write_text("x")
    out = run("shell", {"cmd": "ls; echo oops >&2"}, ctx)
    assert out["exit_code"] == 0 and out["stdout"] == "here.txt\n" and out["stderr"] == "oops\n"
    assert out["truncated"] is False and out["timed_out"] is False


def test_shell_fails_on_a_non_zero_exit_unless_check_is_false(ctx):
    with pytest.raises(ToolError, match="exit code 3: bad") as failed:
        run("shell.run", {"cmd": "echo bad >&2; exit 3"}, ctx)
    assert failed.value.retryable is False and failed.value.output["exit_code"] == 3
    assert run("shell", {"cmd": "exit 3", "check": False}, ctx)["exit_code"] == 3


def test_shell_timeout_kills_the_whole_process_group_and_is_retryable(ctx):
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"timed out after 0\.5 s") as failed:
        run("shell", {"cmd": "sleep 30 & sleep 30; echo never", "timeout": 0.5}, ctx)
    assert time.monotonic() - started < 5
    assert failed.value.retryable is True and failed.value.output["timed_out"] is True
    for bad in (0, 601, "10", True):
        with pytest.raises(ToolError, match="timeout must be"):
            run("shell", {"cmd": "true", "timeout": bad}, ctx)


def test_shell_output_is_capped_with_a_truncated_flag(ctx):
    out = run("shell", {"cmd": "head -c 200000 /dev/zero | tr '\\0' a"}, ctx)
    assert len(out["stdout"]) == OUTPUT_CAP == 64 * 1024
    assert out["truncated"] is True and out["stdout_bytes"] == 200000


def test_shell_takes_argv_or_cmd_and_rejects_unknown_arguments(ctx):
    assert run("shell", {"argv": ["echo", "a b"]}, ctx)["stdout"] == "a b\n"
    with pytest.raises(ToolError, match="exactly one of cmd"):
        run("shell", {}, ctx)
    with pytest.raises(ToolError, match="Unknown argument"):
        run("shell", {"cmd": "true", "shell": True}, ctx)


def test_python_runs_a_script_with_this_interpreter(ctx):
    out = run("python", {"code": "import sys; print(sys.version_info[0]); open('f', 'w')"}, ctx)
    assert out["stdout"] == "3\n" and (ctx.workdir / "f").exists()
    with pytest.raises(ToolError, match="ZeroDivisionError"):
        run("python.run", {"code": "1/0"}, ctx)


# --- files -------------------------------------------------------------------------------


def test_files_write_read_and_list_inside_the_workdir(ctx):
    assert run("files.write", {"path": "a/b.txt", "content": "héllo"}, ctx)["bytes"] == 6
    run("files.write", {"path": "a/b.txt", "content": "!", "append": True}, ctx)
    read = run("files.read", {"path": "a/b.txt"}, ctx)
    assert (read["content"], read["size"], read["truncated"]) == ("héllo!", 7, False)
    assert run("files.read", {"path": "a/b.txt", "max_bytes": 2}, ctx)["truncated"] is True
    listed = run("files.list", {}, ctx)["entries"]
    assert listed == [{"name": "a", "type": "dir", "size": None}]
    assert run("files.list", {"path": "a"}, ctx)["entries"][0]["name"] == "b.txt"


@pytest.mark.parametrize(
    "path", ["../outside.txt", "a/../../outside.txt", "/etc/passwd", "~/x", "", "..", "a\0b"]
)
def test_files_refuses_paths_outside_the_workdir(ctx, path):
    for tool, args in (
        ("files.read", {"path": path}),
        ("files.write", {"path": path, "content": "x"}),
        ("files.list", {"path": path}),
    ):
        with pytest.raises(ToolError, match=r"outside the workdir|absolute|non-empty"):
            run(tool, args, ctx)
    assert not (ctx.workdir.parent / "outside.txt").exists()


def test_files_refuses_symlinks_that_lead_out_of_the_workdir(ctx):
    secret = ctx.workdir.parent / "secret.txt"
    secret.write_text("token")
    (ctx.workdir / "link.txt").symlink_to(secret)
    (ctx.workdir / "dirlink").symlink_to(ctx.workdir.parent)
    (ctx.workdir / "dangling").symlink_to(ctx.workdir.parent / "new.txt")
    with pytest.raises(ToolError, match="outside the workdir"):
        run("files.read", {"path": "link.txt"}, ctx)
    with pytest.raises(ToolError, match="outside the workdir"):
        run("files.write", {"path": "link.txt", "content": "overwritten"}, ctx)
    with pytest.raises(ToolError, match="outside the workdir"):
        run("files.write", {"path": "dirlink/secret.txt", "content": "x"}, ctx)
    with pytest.raises(ToolError, match="outside the workdir"):
        run("files.write", {"path": "dangling", "content": "x"}, ctx)
    with pytest.raises(ToolError, match="outside the workdir"):
        run("files.list", {"path": "dirlink"}, ctx)
    assert secret.read_text() == "token"
    assert not (ctx.workdir.parent / "new.txt").exists()
    # A link that stays inside is fine.
    (ctx.workdir / "real.txt").write_text("inside")
    (ctx.workdir / "alias.txt").symlink_to(ctx.workdir / "real.txt")
    assert run("files.read", {"path": "alias.txt"}, ctx)["content"] == "inside"


# --- http --------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/big":
            self._send(200, b"x" * 100_000)
        elif self.path == "/redirect-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/boom":
            self._send(503, b"down")
        else:
            self._send(200, b"hello " + self.path.encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._send(201, body, self.headers.get("Content-Type", ""))

    def _send(self, status, body, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_gets_and_posts_with_a_size_cap(ctx, web):
    got = run("http", {"url": f"{web}/hi"}, ctx)
    assert (got["status"], got["body"], got["truncated"]) == (200, "hello /hi", False)
    big = run("http.get", {"url": f"{web}/big", "max_bytes": 1000}, ctx)
    assert len(big["body"]) == 1000 and big["truncated"] is True
    posted = run("http.post", {"url": f"{web}/p", "json": {"a": 1}}, ctx)
    assert posted["status"] == 201 and json.loads(posted["body"]) == {"a": 1}
    assert posted["content_type"] == "application/json"


def test_http_only_allows_http_and_https_even_through_redirects(ctx, web):
    for url in ("file:///etc/passwd", "ftp://example.com/x", "gopher://x", "localhost:80", ""):
        with pytest.raises(ToolError, match=r"Only http:// and https://|url must be"):
            run("http", {"url": url}, ctx)
    with pytest.raises(ToolError, match="Only http:// and https://"):
        run("http", {"url": f"{web}/redirect-file"}, ctx)


def test_http_5xx_and_unreachable_hosts_are_retryable(ctx, web):
    with pytest.raises(ToolError, match="HTTP 503") as failed:
        run("http", {"url": f"{web}/boom"}, ctx)
    assert failed.value.retryable is True and failed.value.output["body"] == "down"
    with pytest.raises(ToolError) as unreachable:
        run("http", {"url": "http://127.0.0.1:9/", "timeout": 2}, ctx)
    assert unreachable.value.retryable is True


# --- naming and discovery ----------------------------------------------------------------


def test_a_step_names_a_toolkit_or_toolkit_dot_tool():
    assert resolve_tool(TOOLKITS, "shell")[1] == "run"
    assert resolve_tool(TOOLKITS, "http")[1] == "request"
    assert resolve_tool(TOOLKITS, "files.write")[1] == "write"
    with pytest.raises(ToolError, match=r"files has no default tool; name one of files\.read"):
        resolve_tool(TOOLKITS, "files")
    with pytest.raises(ToolError, match="files has no tool 'delete'"):
        resolve_tool(TOOLKITS, "files.delete")
    with pytest.raises(ToolError, match="no toolkit 'browser'"):
        resolve_tool(TOOLKITS, "browser.open")


def test_toolkits_load_by_slug_through_entry_points_and_describe_their_tools():
    loaded = load_toolkits(["shell", "files"])
    assert {slug: kit.version for slug, kit in loaded.items()} == {"shell": "1.0", "files": "1.0"}
    names = [schema["name"] for schema in loaded["files"].schemas()]
    assert names == ["files.read", "files.write", "files.list"]
    with pytest.raises(Exception, match="No toolkit 'nope'; available: files, http, python"):
        load_toolkits(["nope"])


def _task(steps, required=()):
    return protocol.TaskSpec(
        id=7,
        title="t",
        instructions="do it",
        steps=steps,
        required_toolkits=list(required),
        parent_id=None,
        root_id=7,
    )


def test_tasks_the_agent_cannot_run_are_declined_with_a_reason():
    kits = builtin_toolkits(["shell"])
    assert check_task(_task([]), kits) == ("missing_tool", NO_MODEL)
    assert check_task(_task([{"tool": "shell"}], ["python"]), kits)[0] == "missing_tool"
    reason, message = check_task(_task([{"tool": "shell"}, {"tool": "files.read"}]), kits)
    assert reason == "missing_tool" and message.startswith("step 1:")
    assert check_task(_task([{"tool": "shell"}, {"tool": "checkpoint"}]), kits) is None


# --- config and backoff ------------------------------------------------------------------


def test_the_config_file_is_written_0600_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "nested" / "device.json"
    config = DeviceConfig(server="http://h:1", device_id=3, token="clawd_s", name="n", kind="cloud")
    old_umask = os.umask(0)
    try:
        save_config(config, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_config(path) == config
    path.chmod(0o644)
    save_config(config, path)  # rewriting narrows it again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(path)
    with pytest.raises(ConfigError, match="Pair this device first"):
        load_config(tmp_path / "missing.json")


def test_server_urls_become_agent_socket_urls():
    assert ws_url("http://127.0.0.1:8000/") == "ws://127.0.0.1:8000/ws/agent/"
    assert ws_url("https://claw.example.com/team") == "wss://claw.example.com/team/ws/agent/"
    with pytest.raises(ConfigError, match="http:// or https://"):
        normalize_server("ftp://x")


def test_backoff_doubles_from_1s_to_60s_with_full_jitter_and_resets():
    backoff = Backoff()
    ceilings = []
    for _ in range(10):
        ceiling = backoff.ceiling()
        ceilings.append(ceiling)
        assert 0 <= backoff.next() <= ceiling
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    delays = [Backoff().next() for _ in range(200)]
    assert max(delays) <= 1 and min(delays) < 0.1 and max(delays) > 0.9  # jitter spreads
    backoff.reset()
    assert backoff.ceiling() == 1


def test_frame_ids_are_unique_and_valid_client_ids():
    first, second = FrameIds(), FrameIds()
    ids = [first() for _ in range(3)] + [second()]
    assert len(set(ids)) == 4 and first.prefix != second.prefix
    for frame_id in ids:
        protocol.Heartbeat(type="heartbeat", id=frame_id)


# --- the runner against a scripted session -----------------------------------------------


class ScriptedSession:
    """Answers every frame like a server that accepts everything; records the frames."""

    def __init__(self, decisions=None, reject=None):
        self.frames: list[tuple[str, dict]] = []
        self.decisions = decisions or {}
        self.reject = reject or {}
        self.confirmed: list[int] = []
        self.asked = 0

    async def request(self, model, **fields):
        kind = model.model_fields["type"].annotation.__args__[0]
        frame = model(type=kind, id="x-1", **fields)
        protocol.parse_client_frame(frame.model_dump_json())  # what the server would accept
        self.frames.append((kind, fields))
        if kind in self.reject:
            raise FrameRejected(self.reject[kind], "no")
        return {"checkpoint_id": 41} if kind == "checkpoint_request" else {}

    async def wait_decision(self, checkpoint_id):
        # A list of decisions is answered in turn (the last one repeats).
        decisions = self.decisions if isinstance(self.decisions, list) else [self.decisions]
        fields = decisions[min(self.asked, len(decisions) - 1)]
        self.asked += 1
        return protocol.Decision(checkpoint_id=checkpoint_id, attempt_id=5, **fields)

    async def confirm_decision(self, checkpoint_id):
        self.confirmed.append(checkpoint_id)


def _assignment(steps, status="offered"):
    return protocol.Assignment(
        attempt_id=5, epoch=2, status=status, deadline="2030-01-01T00:00:00Z", task=_task(steps)
    )


def _runner(steps, session, ctx, status="offered", journal=None):
    return AttemptRunner(
        _assignment(steps, status),
        session=session,
        toolkits=TOOLKITS,
        workdir=ctx.workdir,
        journal=journal,
    )


def test_steps_run_in_order_with_one_progress_frame_each_then_complete(ctx):
    session = ScriptedSession(decisions={"status": "approved"})
    steps = [
        {"tool": "files.write", "args": {"path": "x.txt", "content": "hi"}},
        {"tool": "checkpoint", "args": {"title": "Go on?", "options": ["yes", "no"]}},
        {"tool": "shell", "args": {"cmd": "cat x.txt"}},
    ]
    assert asyncio.run(_runner(steps, session, ctx).run()) == "succeeded"
    kinds = [kind for kind, _ in session.frames]
    assert kinds == [
        "accept",
        "progress",
        "checkpoint_request",
        "progress",
        "progress",
        "complete",
    ]
    progress = [fields for kind, fields in session.frames if kind == "progress"]
    assert [p["seq"] for p in progress] == [1, 2, 3]
    assert [(p["data"]["index"], p["data"]["tool"], p["data"]["ok"]) for p in progress] == [
        (0, "files.write", True),
        (1, "checkpoint", True),
        (2, "shell", True),
    ]
    assert progress[2]["data"]["output"]["stdout"] == "hi"
    assert session.frames[2][1]["options"] == ["yes", "no"]
    assert session.confirmed == [41]
    result = session.frames[-1][1]["result"]
    assert [step["tool"] for step in result["steps"]] == ["files.write", "checkpoint", "shell"]


@pytest.mark.parametrize(
    ("decision", "error"),
    [
        ({"status": "rejected", "note": "too risky"}, "checkpoint rejected: too risky"),
        ({"status": "expired", "note": ""}, "checkpoint expired"),
    ],
)
def test_a_checkpoint_that_is_not_approved_fails_the_attempt_for_good(ctx, decision, error):
    session = ScriptedSession(decisions=decision)
    steps = [{"tool": "checkpoint", "args": {"title": "Go?"}}, {"tool": "shell", "args": {}}]
    assert asyncio.run(_runner(steps, session, ctx).run()) == "failed"
    kind, fail = session.frames[-1]
    assert kind == "fail" and fail["retryable"] is False and error in fail["error"]


def test_requested_changes_reach_the_steps_as_new_input_and_the_checkpoint_asks_again(ctx):
    session = ScriptedSession(
        decisions=[{"status": "changes_requested", "note": "use v2"}, {"status": "approved"}]
    )
    steps = [
        {"tool": "checkpoint", "args": {"title": "Go?"}},
        {"tool": "shell", "args": {"cmd": "true"}},
    ]
    runner = _runner(steps, session, ctx)
    assert asyncio.run(runner.run()) == "succeeded"
    assert runner.feedback == ["use v2"]
    logged = [f["data"] for k, f in session.frames if k == "progress" and f["kind"] == "log"]
    assert logged[0]["changes_requested"] == "use v2" and logged[0]["round"] == 1
    asks = [fields for kind, fields in session.frames if kind == "checkpoint_request"]
    assert len(asks) == 2 and "use v2" in asks[1]["details"]


def test_endless_change_requests_fail_the_attempt_after_a_few_rounds(ctx):
    session = ScriptedSession(decisions={"status": "changes_requested", "note": "again"})
    steps = [{"tool": "checkpoint", "args": {"title": "Go?"}}]
    assert asyncio.run(_runner(steps, session, ctx).run()) == "failed"
    kind, fail = session.frames[-1]
    assert kind == "fail" and fail["retryable"] is False and "changes requested" in fail["error"]


def test_a_timed_out_step_fails_retryably_and_a_stale_attempt_stops_quietly(ctx):
    session = ScriptedSession()
    steps = [{"tool": "shell", "args": {"cmd": "sleep 5", "timeout": 0.2}}]
    assert asyncio.run(_runner(steps, session, ctx).run()) == "failed"
    kind, fail = session.frames[-1]
    assert kind == "fail" and fail["retryable"] is True and "timed out" in fail["error"]
    assert session.frames[-2][1]["data"]["ok"] is False

    stale = ScriptedSession(reject={"progress": "stale_attempt"})
    assert asyncio.run(_runner([{"tool": "shell", "args": {"cmd": "true"}}], stale, ctx).run()) == (
        "stale"
    )
    assert [kind for kind, _ in stale.frames] == ["accept", "progress"]


def test_a_resumed_attempt_continues_after_the_last_acknowledged_step(ctx, tmp_path):
    journal = Journal(tmp_path / "state", 5)
    steps = [{"tool": "shell", "args": {"cmd": f"echo {n} >> log"}} for n in range(3)]
    first = ScriptedSession(reject={"complete": "stale_attempt"})
    asyncio.run(_runner(steps, first, ctx, journal=journal).run())
    saved = journal.load(2)
    assert saved["next_seq"] == 4 and len(saved["steps"]) == 3
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600

    saved["steps"], saved["next_seq"] = saved["steps"][:1], 2  # as if killed after step 0
    journal.save(saved)
    (ctx.workdir / "log").write_text("0\n")
    second = ScriptedSession()
    assert asyncio.run(_runner(steps, second, ctx, "running", journal).run()) == "succeeded"
    progress = [fields for kind, fields in second.frames if kind == "progress"]
    assert [(p["seq"], p["data"]["index"]) for p in progress] == [(2, 1), (3, 2)]
    assert second.frames[0][0] == "progress"  # running: no second accept
    assert (ctx.workdir / "log").read_text() == "0\n1\n2\n"
    assert journal.load(3) is None  # another epoch's journal is not this attempt's


def test_binary_output_is_cleaned_so_the_server_can_store_it(ctx):
    session = ScriptedSession()
    steps = [{"tool": "shell", "args": {"cmd": "printf 'a\\000b\\377'; exit 1"}}]
    assert asyncio.run(_runner(steps, session, ctx).run()) == "failed"
    progress = session.frames[1][1]
    assert progress["data"]["output"]["stdout"] == "a\ufffdb\ufffd"
