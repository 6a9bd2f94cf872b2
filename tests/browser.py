"""Real-browser fixtures: Debian's Chromium, driven by Playwright's sync API, against a real
Daphne + Celery worker + beat in services mode on a dedicated PostgreSQL database and Redis
namespace (tests/live.py), with real `claw agent run` processes paired to the groups.

The `site` fixture starts all of it once per module and signs in the personas:

| persona  | user  | role in lab, live, review, failover |
|----------|-------|-------------------------------------|
| owner    | ada   | owner                               |
| approver | bob   | approver                            |
| viewer   | vera  | viewer                              |
| outsider | otto  | none (owns "elsewhere")             |

`pages(persona, phone=False)` opens a signed-in page (1280x800, or 375x812 as a touch phone)
that records when each `event-<seq>` row first appears in its DOM (`seen_rows(page)`), and
collects console errors and uncaught exceptions (`page_errors(page)`). `site.agent(...)`
pairs a device and runs an agent on it; `site.shoot(page, name)` saves var/screenshots/
NAME-desktop.png and NAME-phone.png.

Chromium must be /usr/bin/chromium (`make browser` installs Debian's): Playwright never
downloads a browser here. Without it the tests skip, except under CLAW_TEST_SERVICES=require
(CI), where they fail.
"""

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # require_chromium() skips the tests, or fails them in CI
    expect = None

from tests.live import (
    NO_PROXY_OPENER,
    PYTHON,
    ROOT,
    Proc,
    child_env,
    dedicated_services,
    free_port,
    manage,
    running,
    wait_healthy,
    wait_listening,
)

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}

USERS = {"owner": "ada", "approver": "bob", "viewer": "vera", "outsider": "otto"}
PASSWORDS = {persona: f"{user}-Claw-pw-42" for persona, user in USERS.items()}

# Short policies keep failover quick: a silent agent's attempt is lost within ~3-4 s.
FAST = {"heartbeat_interval_s": 1, "lease_timeout_s": 3, "reconnect_grace_s": 1, "max_attempts": 5}
LAB_CHECKPOINT = "Order more reagents?"
GROUPS = {
    "lab": "Research Lab",
    "live": "Live Ops",
    "review": "Release Review",
    "failover": "Failover Drill",
}

SETUP = """
import json
from django.contrib.auth import get_user_model
from apps.checkpoints.services import checkpoint_raise
from apps.groups.models import Group, Role
from apps.groups.services import api_token_create, group_create, membership_add
User = get_user_model()
users, passwords, groups, fast = {users!r}, {passwords!r}, {groups!r}, {fast!r}
people = {{p: User.objects.create_user(u, password=passwords[p]) for p, u in users.items()}}
owner = people["owner"]
for slug, name in groups.items():
    group = group_create(user=owner, name=name, slug=slug, **fast)
    membership_add(actor=owner, group=group, user=people["approver"], role=Role.APPROVER)
    membership_add(actor=owner, group=group, user=people["viewer"], role=Role.VIEWER)
group_create(user=people["outsider"], name="Elsewhere", slug="elsewhere")
# A decision that waits in the lab from the start: only the lab's people may see it.
checkpoint_raise(
    group=Group.objects.get(slug="lab"), title={lab_checkpoint!r}, source="human",
    details="The supplier closes on Friday.",
)
print(json.dumps({{p: api_token_create(user=people[p], name="browser")[1] for p in users}}))
"""

# Records, in page time (ms since the epoch, like the server's clock), the moment each
# `event-<seq>` row first enters the DOM, however it arrives (render, htmx swap, anything).
SEEN_ROWS_JS = """
(() => {
  const seen = (window.__clawSeenRows = {});
  const note = (node, now) => {
    if (node.nodeType !== 1) return;
    const rows = node.matches('[id^="event-"]') ? [node] : [];
    rows.push(...node.querySelectorAll('[id^="event-"]'));
    for (const row of rows) {
      if (/^event-\\d+$/.test(row.id) && !(row.id in seen)) seen[row.id] = now;
    }
  };
  new MutationObserver((records) => {
    const now = performance.timeOrigin + performance.now();
    for (const record of records) for (const node of record.addedNodes) note(node, now);
  }).observe(document, { childList: true, subtree: true });
})();
"""


def services_mode() -> str:
    return os.environ.get("CLAW_TEST_SERVICES", "auto")


def require_chromium() -> None:
    """Skip (fail under CLAW_TEST_SERVICES=require) unless Playwright and Chromium are here."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install -e '.[dev]')"
    if problem is None and not os.access(CHROMIUM, os.X_OK):
        problem = f"no {CHROMIUM}: install Debian's chromium (`make browser`)"
    if problem is None:
        return
    if services_mode() == "require":
        pytest.fail(f"CLAW_TEST_SERVICES=require but {problem}", pytrace=False)
    pytest.skip(problem)


def epoch_ms(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


def until(predicate, timeout: float, what: str, *procs: Proc, interval: float = 0.1):
    """Poll until predicate() is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            outputs = "\n".join(p.output(40) for p in procs)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{outputs}")
        time.sleep(interval)


def settle(page, predicate, timeout: float, what: str):
    """until(), for predicates fed by Playwright events: waits inside Playwright, so the
    page's events keep being delivered while it polls."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        page.wait_for_timeout(50)
    return value


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- the server side ----------------------------------------------------------------------


class Stack:
    """Daphne, one Celery worker and beat, on the module's dedicated database."""

    def __init__(self, services: dict[str, str], tmp: Path):
        self.services, self.tmp = services, tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = child_env(DJANGO_SETTINGS_MODULE="claw.settings", **services)
        self.procs: list[Proc] = []
        self.tokens: dict[str, str] = {}

    def start(self) -> None:
        web = self._start(
            "daphne",
            [
                PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(self.port),
                "claw.asgi:application",
            ],
        )  # fmt: skip
        worker = self._start(
            "worker",
            [
                PYTHON, "-m", "celery", "-A", "claw", "worker", "--loglevel", "INFO",
                "--concurrency", "2", "--hostname", "browser@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
        )  # fmt: skip
        beat = self._start(
            "beat",
            [
                PYTHON, "-m", "celery", "-A", "claw", "beat", "--loglevel", "INFO",
                "--schedule", str(self.tmp / "beat-schedule"),
            ],
        )  # fmt: skip
        wait_listening(self.port, 30, web)
        worker.wait_for(r"\bready\.", 60)
        wait_healthy(self.base, 60, web, worker, beat)

    def _start(self, name: str, command: list[str]) -> Proc:
        proc = Proc(name, command, self.env)
        self.procs.append(proc)
        return proc

    def setup(self) -> None:
        code = SETUP.format(
            users=USERS,
            passwords=PASSWORDS,
            groups=GROUPS,
            fast=FAST,
            lab_checkpoint=LAB_CHECKPOINT,
        )
        output = manage(self.services, "shell", "-v", "0", "-c", code)
        self.tokens = json.loads(output.strip().splitlines()[-1])

    def api(self, method: str, path: str, body: dict | None = None, *, persona: str = "owner"):
        request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1
            f"{self.base}/api/v1{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={
                "Authorization": f"Bearer {self.tokens[persona]}",
                "Content-Type": "application/json",
            },
        )
        try:
            with NO_PROXY_OPENER.open(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def create_task(self, group: str, title: str, steps: list, **extra) -> int:
        status, task = self.api(
            "POST", f"/groups/{group}/tasks", {"title": title, "steps": steps, **extra}
        )
        assert status == 201, task
        return task["id"]

    def task(self, task_id: int) -> dict:
        status, task = self.api("GET", f"/tasks/{task_id}")
        assert status == 200, task
        return task

    def events(self, group: str, *, task_id: int | None = None, kind: str = "") -> list[dict]:
        found, after = [], 0
        while True:
            status, page = self.api("GET", f"/groups/{group}/events?after={after}&limit=500")
            assert status == 200, page
            found += page["items"]
            if not page["items"]:
                break
            after = page["next_after"]
        return [
            e
            for e in found
            if (task_id is None or e["refs"]["task_id"] == task_id)
            and (not kind or e["kind"] == kind)
        ]

    def pending_checkpoints(self, group: str, task_id: int) -> list[dict]:
        status, page = self.api("GET", f"/groups/{group}/checkpoints?status=pending")
        assert status == 200, page
        return [c for c in page["items"] if c["task_id"] == task_id]

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.close()
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        for proc in self.procs:
            name = re.sub(r"\W+", "-", proc.name)
            (logs / f"{name}.log").write_text("\n".join(proc.lines))

    def tracebacks(self) -> list[str]:
        return [p.output() for p in self.procs if any("Traceback" in line for line in p.lines)]


# --- agents -------------------------------------------------------------------------------


class AgentProc:
    """A `claw agent run` process on its own paired device."""

    def __init__(self, proc: Proc, name: str, device: dict):
        self.proc, self.name, self.device = proc, name, device
        self.agent_id: int | None = None

    @property
    def lines(self) -> list[str]:
        return list(self.proc.lines)

    def connected(self, timeout: float = 30) -> int:
        line = until(
            lambda: next((line for line in self.lines if " as agent " in line), None),
            timeout,
            f"agent {self.name} connected",
            self.proc,
        )
        self.agent_id = int(re.search(r" as agent (\d+)", line).group(1))
        return self.agent_id

    def kill(self) -> None:
        """kill -9, the whole process group: no drain, no goodbye."""
        self.proc.kill()

    def output(self, last: int = 60) -> str:
        return self.proc.output(last)


# --- the browser side ---------------------------------------------------------------------


class Site:
    """The running stack, Chromium, and each persona's signed-in session."""

    def __init__(self, stack: Stack, browser, tmp: Path):
        self.stack, self.browser, self.tmp = stack, browser, tmp
        self.base = stack.base
        self.sessions: dict[str, dict] = {}
        self.agents: list[AgentProc] = []

    def url(self, path: str) -> str:
        return self.base + path

    def new_page(self, *, phone: bool = False, storage_state: dict | None = None):
        options = {"viewport": PHONE, "is_mobile": True, "has_touch": True} if phone else {}
        context = self.browser.new_context(
            base_url=self.base,
            viewport=options.pop("viewport", DESKTOP),
            storage_state=storage_state,
            **options,
        )
        context.set_default_timeout(10_000)
        context.add_init_script(SEEN_ROWS_JS)
        page = context.new_page()
        page._claw_errors = []  # test-side bookkeeping
        errors = page._claw_errors

        def console(message) -> None:
            # Failed subresources are reported with their URL below.
            if message.type == "error" and "Failed to load resource" not in message.text:
                errors.append(f"console: {message.text}")

        def response(resp) -> None:
            request = resp.request
            subresource = request.resource_type != "document"
            if resp.status >= 400 and subresource and not request.url.endswith("/favicon.ico"):
                errors.append(f"{resp.status} {request.method} {request.url}")

        frames = page._claw_frames = {"sent": [], "received": []}

        def websocket(ws) -> None:
            if "/ws/live/" in ws.url:
                ws.on("framesent", lambda payload: frames["sent"].append(payload))
                ws.on("framereceived", lambda payload: frames["received"].append(payload))

        page.on("console", console)
        page.on("response", response)
        page.on("websocket", websocket)
        page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
        return page

    def sign_in(self, page, persona: str, *, goto: bool = True) -> None:
        """Through the real form, as a person would (goto=False: the form is already open)."""
        if goto:
            page.goto("/login/")
        page.fill("#id_username", USERS[persona])
        page.fill("#id_password", PASSWORDS[persona])
        with page.expect_navigation():
            page.click("form[action='/login/'] button[type=submit]")
        assert "/login/" not in page.url, f"sign-in failed for {persona}: {page.url}"

    def session(self, persona: str) -> dict:
        if persona not in self.sessions:
            page = self.new_page()
            try:
                self.sign_in(page, persona)
                self.sessions[persona] = page.context.storage_state()
            finally:
                page.context.close()
        return self.sessions[persona]

    @contextlib.contextmanager
    def agent(
        self,
        group: str,
        name: str,
        *,
        device: str,
        kind: str = "laptop",
        toolkits: tuple[str, ...] = ("shell",),
        capacity: int = 1,
    ) -> Iterator[AgentProc]:
        """Pair a new device to the group (a one-time code, as `claw device pair` does) and
        run `claw agent run` on it until the block ends (SIGTERM: it drains)."""
        from claw.device.config import DeviceConfig, save_config

        status, code = self.stack.api("POST", f"/groups/{group}/pairing-codes")
        assert status == 201, code
        status, paired = self.stack.api(
            "POST", "/devices/pair", {"code": code["code"], "name": device, "kind": kind}
        )
        assert status == 201, paired
        home = self.tmp / "devices" / device
        config = home / "device.json"
        save_config(
            DeviceConfig(
                server=self.base,
                device_id=paired["device"]["id"],
                token=paired["token"],
                name=device,
                kind=kind,
                group_id=paired["group_id"],
            ),
            config,
        )
        command = [
            PYTHON, "-m", "claw.device", "agent", "run", "--name", name, "--config", str(config),
            "--workdir", str(home / "work"), "--grace", "2", "--capacity", str(capacity),
            *[arg for slug in toolkits for arg in ("--toolkit", slug)],
        ]  # fmt: skip
        with running(f"agent {name}", command, child_env()) as proc:
            agent = AgentProc(proc, name, {"name": device, **paired["device"]})
            self.agents.append(agent)
            agent.connected()
            yield agent

    def shoot(self, page, name: str, widths: tuple[str, ...] = ("desktop", "phone")) -> list[Path]:
        """Full-page screenshots of the page as it is now: var/screenshots/NAME-WIDTH.png."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        original = page.viewport_size
        paths = []
        try:
            for label in widths:
                size = {"desktop": DESKTOP, "phone": PHONE}[label]
                page.set_viewport_size(size)
                path = SCREENSHOTS / f"{name}-{label}.png"
                page.screenshot(path=str(path), full_page=True)
                paths.append(path)
        finally:
            page.set_viewport_size(original)
        return paths


def seen_rows(page) -> dict[int, float]:
    """seq -> when its `event-<seq>` row first entered the page's DOM (ms since the epoch)."""
    seen = page.evaluate("window.__clawSeenRows || {}")
    return {int(key.split("-", 1)[1]): value for key, value in seen.items()}


def wait_live(page, *, first_frame: bool = False, timeout: float = 10) -> None:
    """Wait until the page's live socket has resumed (and, with first_frame, until the
    server's first answer arrived: cross-group pages are redrawn on every connect)."""
    frames = page._claw_frames
    settle(page, lambda: any('"resume"' in f for f in frames["sent"]), timeout, "live resume")
    if first_frame:
        settle(page, lambda: frames["received"], timeout, "the live socket's first frame")


def page_errors(page) -> list[str]:
    return list(page._claw_errors)


# --- fixtures -----------------------------------------------------------------------------

TIMINGS: list[str] = []


# Modules use them with `from tests.browser import pages_fixture, site_fixture`.
@pytest.fixture(scope="module", name="site")
def site_fixture(request, tmp_path_factory) -> Iterator[Site]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("browser")
    for old in SCREENSHOTS.glob("*.png"):  # only this run's pictures
        old.unlink()
    started = time.monotonic()
    with dedicated_services("browser", tmp) as services:
        stack = Stack(services, tmp)
        try:
            stack.start()
            stack.setup()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM),
                    headless=True,
                    args=["--no-sandbox", "--disable-dev-shm-usage"],
                )
                try:
                    site = Site(stack, browser, tmp)
                    TIMINGS.append(f"stack and browser up in {time.monotonic() - started:.1f} s")
                    yield site
                finally:
                    browser.close()
        finally:
            stack.close()
            _report(request, started)
    tracebacks = stack.tracebacks()
    assert not tracebacks, "\n".join(tracebacks)


def _report(request, started: float) -> None:
    TIMINGS.append(f"browser module: {time.monotonic() - started:.1f} s")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_sep("-", "browser timings")
            for line in TIMINGS:
                reporter.write_line(line)
    TIMINGS.clear()


@pytest.fixture(name="pages")
def pages_fixture(site):
    """pages(persona, phone=False): a new signed-in page; closed when the test ends."""
    opened = []

    def open_page(persona: str | None, *, phone: bool = False):
        state = site.session(persona) if persona else None
        page = site.new_page(phone=phone, storage_state=state)
        opened.append(page)
        return page

    yield open_page
    for page in opened:
        with contextlib.suppress(Exception):
            page.context.close()
