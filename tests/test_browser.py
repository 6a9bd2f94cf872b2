"""The dashboard in a real browser (Chromium via Playwright) against a real Daphne, Celery
worker and beat on PostgreSQL and Redis, with real agents: signing in, creating a task,
watching an agent's progress arrive live (and how fast), deciding checkpoints from the
approvals inbox on a phone, failover after kill -9, and what an outsider cannot see.

One stack serves the module (tests/browser.py); each scenario with agents has its own group
so one scenario's agents never take another's tasks. Screenshots of every main page at
desktop and phone widths land in var/screenshots/.
"""

import pytest

from tests.browser import (  # noqa: F401 - the fixtures `site` and `pages`
    GROUPS,
    LAB_CHECKPOINT,
    TIMINGS,
    USERS,
    epoch_ms,
    expect,
    page_errors,
    pages_fixture,
    percentile,
    seen_rows,
    site_fixture,
    until,
    wait_live,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.timeout(180),
]

PROGRESS_STEPS = 20
LATENCY_P95_BUDGET_MS = 250
TERMINAL = {"succeeded", "failed", "cancelled", "blocked"}


def wait_task(site, task_id: int, statuses: set[str], timeout: float, *procs) -> dict:
    return until(
        lambda: (task := site.stack.task(task_id))["status"] in statuses and task,
        timeout,
        f"task {task_id} to be {sorted(statuses)}",
        *procs,
        *site.stack.procs,
    )


def mark_no_reload(page) -> None:
    """A reload or navigation would clear this; `assert_not_reloaded` checks it is still set."""
    page.evaluate("window.__clawSamePage = true")


def assert_not_reloaded(page) -> None:
    assert page.evaluate("window.__clawSamePage === true"), "the page was reloaded"


# --- signing in and creating work ---------------------------------------------------------


def test_signing_in_lands_on_the_groups_page(site, pages):
    page = pages(None)
    page.goto("/groups/")
    assert "/login/" in page.url  # signed out: the sign-in form first
    page.fill("#id_username", USERS["owner"])
    page.fill("#id_password", "not the password")
    page.click("form[action='/login/'] button[type=submit]")
    expect(page.locator("[role=alert]")).to_contain_text("did not match")

    site.sign_in(page, "owner", goto=False)
    assert page.url == site.url("/groups/")
    for name in GROUPS.values():
        expect(page.get_by_text(name).first).to_be_visible()
    expect(page.get_by_text("Elsewhere")).to_have_count(0)
    site.shoot(page, "groups")
    assert not page_errors(page)


def test_a_task_created_from_the_form_shows_on_the_board(site, pages):
    page = pages("owner")
    page.goto("/g/lab/tasks/new/")
    site.shoot(page, "task-new")
    page.fill("#id_title", "Measure the spectrometer drift")
    page.fill("#id_instructions", "Compare today's readings with last week's.")
    page.fill("#id_steps", '[{"tool": "shell", "args": {"cmd": "./measure --drift"}}]')
    with page.expect_navigation():
        page.click("#task-create-submit")
    expect(page.locator("#task-title")).to_contain_text("Measure the spectrometer drift")
    expect(page.locator("#task-steps")).to_contain_text("./measure --drift")

    page.goto("/g/lab/tasks/")
    expect(page.get_by_text("Measure the spectrometer drift")).to_be_visible()
    site.shoot(page, "board")
    _, listing = site.stack.api("GET", "/groups/lab/tasks")
    titles = [task["title"] for task in listing["items"]]
    assert titles.count("Measure the spectrometer drift") == 1
    assert not page_errors(page)


# --- live progress ------------------------------------------------------------------------


def test_an_agents_progress_appears_live_in_the_open_task_page(site, pages):
    steps = [{"tool": "shell", "args": {"cmd": "sleep 0.15"}} for _ in range(PROGRESS_STEPS)]
    task_id = site.stack.create_task("live", "Stream twenty steps", steps)
    page = pages("viewer")
    page.goto(f"/g/live/tasks/{task_id}/")
    wait_live(page)
    mark_no_reload(page)

    # The agent starts only now, so every step's event happens while the page watches.
    with site.agent("live", "streamer", device="stream-box") as agent:
        wait_task(site, task_id, TERMINAL, 30, agent.proc)
        expect(page.locator("#task-status")).to_contain_text("succeeded")

    progress = site.stack.events("live", task_id=task_id, kind="progress.step")
    assert len(progress) == PROGRESS_STEPS
    rows = page.locator("#event-stream")
    for event in progress:
        expect(rows.locator(f"#event-{event['seq']}")).to_have_count(1)
    assert_not_reloaded(page)

    seen = seen_rows(page)
    latencies = [seen[e["seq"]] - epoch_ms(e["created_at"]) for e in progress]
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    TIMINGS.append(
        f"progress event -> DOM over {len(latencies)} events: p50 {p50:.0f} ms, "
        f"p95 {p95:.0f} ms, min {min(latencies):.0f} ms, max {max(latencies):.0f} ms"
    )
    site.shoot(page, "task-detail-live")
    assert min(latencies) > -50, f"clocks disagree: {latencies}"  # one machine, one clock
    assert p95 <= LATENCY_P95_BUDGET_MS, sorted(latencies)
    assert not page_errors(page)


# --- checkpoints --------------------------------------------------------------------------


def release_steps(title: str) -> list[dict]:
    return [
        {"tool": "shell", "args": {"cmd": "echo built"}},
        {
            "tool": "checkpoint",
            "args": {"title": title, "details": "Release notes are in the task.", "options": []},
        },
        {"tool": "shell", "args": {"cmd": "echo shipped"}},
    ]


def test_an_approver_approves_from_a_phone_in_two_taps_and_the_agent_finishes(site, pages):
    phone = pages("approver", phone=True)
    phone.goto("/g/review/")
    wait_live(phone)
    mark_no_reload(phone)
    badge = phone.locator("#approvals-badge")
    waiting = int(badge.inner_text())  # the lab's checkpoint waits too
    task_id = site.stack.create_task("review", "Ship release 1.4", release_steps("Ship 1.4?"))
    with site.agent("review", "shipper", device="release-box", kind="cloud") as agent:
        [checkpoint] = until(
            lambda: site.stack.pending_checkpoints("review", task_id), 20, "a checkpoint"
        )
        expect(badge).to_have_text(str(waiting + 1))  # arrived live, no reload
        assert_not_reloaded(phone)

        badge.tap()  # tap 1
        phone.wait_for_url("**/approvals/")
        card = phone.locator(f"#checkpoint-{checkpoint['id']}")
        expect(card).to_contain_text("Ship 1.4?")
        site.shoot(phone, "approvals-inbox", widths=("phone",))
        with phone.expect_navigation():
            card.locator(f"#approve-{checkpoint['id']}").tap()  # tap 2

        task = wait_task(site, task_id, TERMINAL, 20, agent.proc)
        assert task["status"] == "succeeded", task
        assert any("approved" in line for line in agent.lines), agent.output()

    phone.goto(f"/g/review/tasks/{task_id}/")
    expect(phone.locator("#task-status")).to_contain_text("succeeded")
    expect(phone.locator("#event-stream")).to_contain_text("shipped")
    assert not page_errors(phone)


def test_requesting_changes_delivers_the_note_to_the_agent(site, pages):
    note = "Bump the changelog date first"
    task_id = site.stack.create_task("review", "Ship release 1.5", release_steps("Ship 1.5?"))
    page = pages("approver")
    with site.agent("review", "shipper-2", device="release-box-2", kind="cloud") as agent:
        [first] = until(
            lambda: site.stack.pending_checkpoints("review", task_id), 20, "a checkpoint"
        )
        page.goto("/approvals/")
        # On connect the socket redraws the whole inbox, which wipes a note being typed
        # (reported): type once that has happened.
        wait_live(page, first_frame=True)
        card = page.locator(f"#checkpoint-{first['id']}")
        expect(card).to_contain_text("Ship 1.5?")
        card.get_by_text("Add a note").click()
        card.locator(f"#note-{first['id']}").fill(note)
        site.shoot(page, "approvals-note")
        with page.expect_navigation():
            card.locator(f"#changes-{first['id']}").click()
        expect(page.locator(f"#checkpoint-{first['id']}")).to_have_count(0)

        # The agent takes the note as new input: it logs it as progress and asks again,
        # the new checkpoint listing what was asked.
        [again] = until(
            lambda: site.stack.pending_checkpoints("review", task_id),
            20,
            "the checkpoint asked again",
            agent.proc,
        )
        assert again["id"] != first["id"] and note in again["details"], again
        logged = site.stack.events("review", task_id=task_id, kind="progress.log")
        assert [e["payload"].get("changes_requested") for e in logged] == [note], logged
        card = page.locator(f"#checkpoint-{again['id']}")
        expect(card).to_contain_text(note)
        with page.expect_navigation():
            card.locator(f"#approve-{again['id']}").click()
        task = wait_task(site, task_id, TERMINAL, 20, agent.proc)

    assert task["status"] == "succeeded", task
    assert task["result"]["steps"][1]["output"]["changes_requested"] == [note], task["result"]
    page.goto(f"/g/review/tasks/{task_id}/")
    expect(page.locator("#event-stream")).to_contain_text(note)
    site.shoot(page, "task-detail-changes")
    assert not page_errors(page)


# --- failover -----------------------------------------------------------------------------


def test_a_killed_agents_attempt_is_lost_and_retried_on_another_device(site, pages):
    release = site.tmp / "failover-go"
    steps = [
        {"tool": "shell", "args": {"cmd": "echo started"}},
        {"tool": "shell", "args": {"cmd": f"while [ ! -e {release} ]; do sleep 0.1; done"}},
        {"tool": "shell", "args": {"cmd": "echo finished"}},
    ]
    with (
        site.agent("failover", "alpha", device="ada-laptop") as alpha,
        site.agent("failover", "beta", device="cloud-box", kind="cloud") as beta,
    ):
        agents = {alpha.agent_id: alpha, beta.agent_id: beta}
        task_id = site.stack.create_task("failover", "Survive a crash", steps)
        page = pages("owner")
        page.goto(f"/g/failover/tasks/{task_id}/")
        mark_no_reload(page)
        task = wait_task(site, task_id, {"running"}, 20, alpha.proc, beta.proc)
        holder = agents[task["attempts"][-1]["agent"]["id"]]
        other = beta if holder is alpha else alpha
        until(
            lambda: any("step 0 (shell) done" in line for line in holder.lines),
            10,
            "the first step",
            holder.proc,
        )
        holder.kill()  # kill -9 mid-task
        release.touch()

        timeline = page.locator("#attempt-timeline")
        lost, retried = timeline.locator("#attempt-1"), timeline.locator("#attempt-2")
        expect(lost).to_have_attribute("data-status", "lost", timeout=20_000)
        expect(lost).to_contain_text(f"{holder.name} @ {holder.device['name']}")
        expect(retried).to_have_attribute("data-status", "succeeded", timeout=20_000)
        expect(retried).to_contain_text(f"{other.name} @ {other.device['name']}")
        expect(page.locator("#task-status")).to_have_text("succeeded")
        assert_not_reloaded(page)
        site.shoot(page, "task-detail-failover")
        for name, path in (("overview", "/g/failover/"), ("agents", "/g/failover/agents/")):
            page.goto(path)  # while beta is still online
            site.shoot(page, f"{name}-failover")

    attempts = site.stack.task(task_id)["attempts"]
    assert [a["status"] for a in attempts] == ["lost", "succeeded"], attempts
    assert attempts[-1]["agent"]["id"] == other.agent_id
    assert not page_errors(page)


# --- permissions and every page -----------------------------------------------------------


def test_an_outsider_cannot_see_the_group(site, pages):
    task_id = site.stack.create_task("lab", "Private lab work", [])
    page = pages("outsider")
    for path in (
        "/g/lab/",
        "/g/lab/members/",
        "/g/lab/agents/",
        "/g/lab/tasks/",
        "/g/lab/tasks/new/",
        f"/g/lab/tasks/{task_id}/",
    ):
        response = page.goto(path)
        assert response.status == 404, (path, response.status)
        expect(page.get_by_text("Private lab work")).to_have_count(0)
    page.goto("/groups/")
    expect(page.get_by_text("Elsewhere").first).to_be_visible()
    expect(page.get_by_text("Research Lab")).to_have_count(0)
    page.goto("/approvals/")
    expect(page.locator("#approvals-empty")).to_be_visible()
    expect(page.get_by_text(LAB_CHECKPOINT)).to_have_count(0)

    lab = pages("approver")  # the lab's approver has it in the inbox; the outsider did not
    lab.goto("/approvals/")
    expect(lab.get_by_text(LAB_CHECKPOINT)).to_be_visible()


MAIN_PAGES = {
    "groups": "/groups/",
    "overview": "/g/failover/",
    "members": "/g/failover/members/",
    "agents": "/g/failover/agents/",
    "toolkits": "/g/failover/toolkits/",
    "board": "/g/failover/tasks/",
    "task-new": "/g/failover/tasks/new/",
    "approvals": "/approvals/",
    "tokens": "/me/tokens/",
}


def test_every_main_page_renders_at_desktop_and_phone_widths(site, pages):
    page = pages("owner")
    too_wide = {}
    for name, path in MAIN_PAGES.items():
        response = page.goto(path)
        assert response.status == 200, (path, response.status)
        site.shoot(page, name)
        page.set_viewport_size({"width": 375, "height": 812})
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 375:
            too_wide[path] = width
        page.set_viewport_size({"width": 1280, "height": 800})
    task_id = site.stack.api("GET", "/groups/failover/tasks")[1]["items"][0]["id"]
    page.goto(f"/g/failover/tasks/{task_id}/")
    site.shoot(page, "task-detail")
    assert not too_wide, f"pages wider than a 375 px phone: {too_wide}"
    assert not page_errors(page)
