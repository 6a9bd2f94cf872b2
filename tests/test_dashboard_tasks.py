"""Task pages: the board, the create form and the task page, their permissions, their live
renderers, artifact previews, and query counts that do not grow with the group."""

import io
import re
import time
import zipfile

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from apps.dashboard.graph import layers
from apps.dashboard.live import PAGES, LiveContext
from apps.dashboard.previews import render_markdown
from apps.devices.models import Toolkit
from apps.events.models import Event
from apps.tasks.models import Task, TaskStatus
from apps.tasks.services import (
    artifact_create,
    attempt_accept,
    attempt_lose,
    attempt_progress,
    task_assign,
    task_cancel,
    task_create,
)
from tests.conftest import make_agent

CHOICE = {
    "reason": "the only capable agent with free capacity",
    "chosen": None,
    "candidates": [],
}


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    return tmp_path


@pytest.fixture
def toolkits(db):
    return [Toolkit.objects.get_or_create(slug=slug)[0] for slug in ("shell", "python", "browser")]


def client_for(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def board_url(personas) -> str:
    return f"/g/{personas.group.slug}/tasks/"


def new_task(personas, title="Task", **kwargs) -> Task:
    return task_create(group=personas.group, actor=personas.member, title=title, **kwargs)


def run(task: Task, agent, choice=None):
    attempt = task_assign(task_id=task.id, agent_id=agent.id, choice=choice)
    return attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)


def html(response) -> str:
    return response.content.decode()


# --- permissions -------------------------------------------------------------------------

READERS = ["owner", "approver", "member", "viewer"]


@pytest.mark.parametrize("persona", [*READERS, "outsider", None])
@pytest.mark.parametrize("page", ["board", "detail", "create"])
def test_pages_by_persona(personas, page, persona):
    task = new_task(personas, "Visible task")
    url = {
        "board": board_url(personas),
        "detail": f"{board_url(personas)}{task.id}/",
        "create": f"{board_url(personas)}new/",
    }[page]
    response = client_for(getattr(personas, persona) if persona else None).get(url)

    if persona is None:
        assert response.status_code == 302 and "/login/" in response["Location"]
    elif persona == "outsider":
        assert response.status_code == 404
    elif page == "create" and persona == "viewer":
        assert response.status_code == 403
    else:
        assert response.status_code == 200
        if page != "create":
            assert "Visible task" in html(response)


@pytest.mark.parametrize("persona", ["viewer", "outsider"])
def test_viewers_and_outsiders_cannot_cancel_retry_or_create(personas, persona):
    task = new_task(personas)
    client = client_for(getattr(personas, persona))
    expected = 403 if persona == "viewer" else 404

    assert client.post(f"{board_url(personas)}{task.id}/cancel/").status_code == expected
    assert client.post(f"{board_url(personas)}{task.id}/retry/").status_code == expected
    assert client.post(f"{board_url(personas)}new/", {"title": "x"}).status_code == expected
    task.refresh_from_db()
    assert task.status == TaskStatus.READY
    assert Task.objects.filter(group=personas.group).count() == 1


def test_viewers_see_no_action_buttons_and_members_do(personas):
    task = new_task(personas)
    viewer = html(client_for(personas.viewer).get(board_url(personas)))
    member = html(client_for(personas.member).get(board_url(personas)))

    assert f'action="{board_url(personas)}{task.id}/cancel/"' not in viewer
    assert 'id="task-new"' not in viewer
    assert f'action="{board_url(personas)}{task.id}/cancel/"' in member
    assert 'id="task-new"' in member


def test_a_member_cancels_then_retries_from_the_board(personas):
    task = new_task(personas)
    child = new_task(personas, "Child", parent_id=task.id)
    client = client_for(personas.member)

    response = client.post(f"{board_url(personas)}{task.id}/cancel/", {"next": board_url(personas)})
    assert response.status_code == 302 and response["Location"] == board_url(personas)
    task.refresh_from_db()
    child.refresh_from_db()
    assert (task.status, child.status) == (TaskStatus.CANCELLED, TaskStatus.CANCELLED)
    assert "Cancelled task" in html(client.get(board_url(personas)))

    client.post(f"{board_url(personas)}{task.id}/retry/")
    task.refresh_from_db()
    assert task.status == TaskStatus.READY


def test_cancelling_a_finished_task_says_why_and_an_offsite_next_is_ignored(personas):
    task = new_task(personas)
    task_cancel(actor=personas.member, task=task)
    client = client_for(personas.member)

    response = client.post(
        f"{board_url(personas)}{task.id}/cancel/", {"next": "https://evil.example/"}
    )
    assert response["Location"] == f"{board_url(personas)}{task.id}/"
    assert "already cancelled" in html(client.get(response["Location"]))


def test_a_task_of_another_group_is_not_found_under_this_group(personas):
    other = task_create(group=personas.other_group, actor=personas.outsider, title="Theirs")
    response = client_for(personas.member).get(f"{board_url(personas)}{other.id}/")
    assert response.status_code == 404


# --- the board ---------------------------------------------------------------------------


def test_the_board_groups_cards_by_status_with_holder_and_attempt(personas, toolkits):
    ready = new_task(personas, "Ready one", required_toolkits=["shell"])
    running = new_task(personas, "Running one", required_toolkits=["python", "shell"])
    run(running, personas.agent)
    waiting = new_task(personas, "Waiting one", depends_on=[ready.id])

    page = html(client_for(personas.viewer).get(board_url(personas)))

    for status in ("waiting", "ready", "assigned", "running", "blocked", "succeeded"):
        assert f'id="board-list-{status}"' in page
        assert f'id="board-count-{status}"' in page
    columns = dict(
        re.findall(r'id="board-list-(\w+)"[^>]*>(.*?)</div>\s*<p id="board-more', page, re.S)
    )
    assert f'id="task-card-{ready.id}"' in columns["ready"]
    assert f'id="task-card-{waiting.id}"' in columns["waiting"]
    card = columns["running"]
    assert f'id="task-card-{running.id}"' in card
    assert "alpha @ alpha-device" in card and "attempt 1" in card
    assert "<li>python</li>" in card and "<li>shell</li>" in card
    assert re.search(r'id="board-count-running"[^>]*>1<', page)


def test_board_filters_by_toolkit_agent_device_and_parent(personas, toolkits):
    shell = new_task(personas, "Shell task", required_toolkits=["shell"])
    python = new_task(personas, "Python task", required_toolkits=["python"])
    child = new_task(personas, "Child task", parent_id=python.id)
    run(shell, personas.agent)
    client = client_for(personas.member)

    def titles(query: str) -> set[str]:
        page = html(client.get(board_url(personas) + query))
        return set(re.findall(r'class="task-card-title"[^>]*>#\d+ ([^<]+)<', page))

    assert titles("") == {"Shell task", "Python task", "Child task"}
    assert titles("?toolkit=python") == {"Python task"}
    assert titles(f"?agent={personas.agent.id}") == {"Shell task"}
    assert titles(f"?device={personas.agent.device_id}") == {"Shell task"}
    assert titles(f"?parent={python.id}") == {"Child task"}
    assert titles("?agent=nonsense") == {"Shell task", "Python task", "Child task"}
    assert child.id


def test_columns_are_capped_with_a_link_to_the_paged_list(personas, settings):
    from apps.dashboard import task_views

    settings.DEBUG = False
    cap = task_views.COLUMN_CAP
    for i in range(cap + 3):
        Task.objects.create(group=personas.group, title=f"bulk {i}", max_attempts=1)
    client = client_for(personas.member)

    page = html(client.get(board_url(personas)))
    assert page.count('class="task-card"') == cap
    assert re.search(r'id="board-more-ready"[^>]*><a href="[^"]*\?status=ready">3 more</a>', page)

    listed = html(client.get(board_url(personas) + "?status=ready"))
    assert listed.count('class="task-card"') == cap + 3
    assert 'id="board-back"' in listed


# --- creating ----------------------------------------------------------------------------


def test_creating_a_task_with_everything(personas, toolkits):
    dep = new_task(personas, "First")
    parent = new_task(personas, "Parent")
    client = client_for(personas.member)
    page = html(client.get(f"{board_url(personas)}new/?parent={parent.id}"))
    assert 'value="shell"' in page and f'<option value="{parent.id}" selected' in page

    response = client.post(
        f"{board_url(personas)}new/",
        {
            "title": "Second",
            "instructions": "Do it",
            "required_toolkits": ["shell"],
            "depends_on": [str(dep.id)],
            "parent": str(parent.id),
            "steps": '[{"tool": "shell.run", "args": {"cmd": "true"}}]',
            "max_attempts": "4",
            "priority": "5",
            "checkpoint_policy": "review_result",
        },
    )

    task = Task.objects.get(title="Second")
    assert (
        response.status_code == 302 and response["Location"] == f"{board_url(personas)}{task.id}/"
    )
    assert task.required_toolkits == ["shell"] and task.parent_id == parent.id
    assert list(task.dependencies.values_list("id", flat=True)) == [dep.id]
    assert task.steps == [{"tool": "shell.run", "args": {"cmd": "true"}}]
    assert (task.max_attempts, task.priority, task.status) == (4, 5, TaskStatus.WAITING)
    assert task.checkpoint_policy == "review_result"


def test_bad_steps_json_shows_the_error_and_keeps_the_input(personas, toolkits):
    client = client_for(personas.member)
    steps = '[{"tool": "shell.run", "args": }]'
    response = client.post(
        f"{board_url(personas)}new/",
        {
            "title": "Keep me",
            "instructions": "Line one",
            "steps": steps,
            "priority": "7",
            "required_toolkits": ["python"],
        },
    )

    page = html(response)
    assert response.status_code == 422
    assert 'id="id_steps_error"' in page and "Not valid JSON (line 1, column 32)" in page
    assert 'value="Keep me"' in page and "Line one</textarea>" in page
    assert "[{&quot;tool&quot;: &quot;shell.run&quot;, &quot;args&quot;: }]</textarea>" in page
    assert 'value="7"' in page and re.search(r'value="python"[^>]*checked', page)
    assert not Task.objects.filter(title="Keep me").exists()


def test_steps_the_service_refuses_are_shown_on_the_steps_field(personas):
    response = client_for(personas.member).post(
        f"{board_url(personas)}new/",
        {"title": "Bad tool", "steps": '[{"tool": "no spaces allowed"}]', "priority": "0"},
    )
    page = html(response)
    assert response.status_code == 422
    assert re.search(r'id="id_steps_error".*steps\[tool\]', page, re.S)
    assert "no spaces allowed" in page


def test_an_unknown_dependency_is_shown_on_its_field_and_kept(personas):
    other = task_create(group=personas.other_group, actor=personas.outsider, title="Theirs")
    response = client_for(personas.member).post(
        f"{board_url(personas)}new/",
        {"title": "Depends", "depends_on": [str(other.id)], "priority": "0"},
    )
    page = html(response)
    assert response.status_code == 422
    assert 'id="id_depends_on_error"' in page and "not in this group" in page


# --- the task page -----------------------------------------------------------------------


def test_layers_are_the_longest_path_from_a_source():
    diamond = [(1, 2), (1, 3), (2, 4), (3, 4), (1, 4)]
    assert layers([1, 2, 3, 4, 5], diamond) == {1: 0, 2: 1, 3: 1, 4: 2, 5: 0}
    assert layers([1, 2, 3], [(1, 2), (2, 3), (3, 1)])[1] >= 0  # a cycle does not hang


def test_the_task_page_draws_a_diamond_in_layers(personas):
    root = new_task(personas, "Plan")
    a = new_task(personas, "A", parent_id=root.id)
    b = new_task(personas, "B", parent_id=root.id, depends_on=[a.id])
    c = new_task(personas, "C", parent_id=root.id, depends_on=[a.id])
    d = new_task(personas, "D", parent_id=root.id, depends_on=[b.id, c.id])

    page = html(client_for(personas.viewer).get(f"{board_url(personas)}{b.id}/"))
    graph = page[page.index('id="task-graph"') :]
    graph = graph[: graph.index("</svg>")]
    nodes = dict(
        re.findall(
            r'id="graph-node-(\d+)" class="node[^"]*" data-status="\w+" data-layer="(\d+)"', graph
        )
    )
    assert nodes == {
        str(root.id): "0",
        str(a.id): "0",
        str(b.id): "1",
        str(c.id): "1",
        str(d.id): "2",
    }
    assert f'id="graph-node-{b.id}" class="node current"' in graph
    assert f'href="{board_url(personas)}{d.id}/"' in graph
    deps = re.findall(r'class="edge edge-dependency"[^>]*data-src="(\d+)" data-dst="(\d+)"', graph)
    assert sorted(deps) == sorted(
        [
            (str(a.id), str(b.id)),
            (str(a.id), str(c.id)),
            (str(b.id), str(d.id)),
            (str(c.id), str(d.id)),
        ]
    )
    assert len(re.findall(r"edge-parent", graph)) == 4


def test_the_timeline_shows_a_lost_attempt_then_a_running_one_elsewhere(personas):
    task = new_task(personas, "Flaky")
    choice = {
        "reason": "on another device than the failed attempts",
        "chosen": None,
        "candidates": [{"agent_id": 0, "name": "beta", "success_rate": 0.5, "load": 0.0}],
    }
    first = run(task, personas.agent, choice=CHOICE)
    attempt_lose(attempt_id=first.id, reason="lease expired")
    beta = make_agent(personas.group, "beta")
    choice["chosen"] = choice["candidates"][0]["agent_id"] = beta.id
    run(task, beta, choice=choice)

    page = html(client_for(personas.viewer).get(f"{board_url(personas)}{task.id}/"))
    timeline = page[page.index('id="attempt-timeline"') :]
    bars = re.findall(r'id="attempt-bar-(\d)" data-status="(\w+)" data-row="(\d)"', timeline)
    assert bars == [("1", "lost", "0"), ("2", "running", "1")]
    assert "alpha @ alpha-device" in timeline and "beta @ beta-device" in timeline
    assert "lease expired" in timeline and "Reassigned" in timeline
    why = timeline[timeline.index('id="why-2"') :]
    assert "on another device than the failed attempts" in why
    assert '<tr class="chosen"><td>beta</td><td>0.5</td>' in why
    assert re.search(r'id="task-status"[^>]*>running<', page)


def test_the_event_stream_shows_the_tasks_progress_with_seq(personas):
    task = new_task(personas)
    attempt = run(task, personas.agent)
    seq = attempt_progress(
        attempt_id=attempt.id,
        agent=personas.agent,
        epoch=attempt.epoch,
        kind="step",
        payload={"index": 0, "tool": "shell.run", "ok": True, "output": {"stdout": "hi"}},
    )
    page = html(client_for(personas.viewer).get(f"{board_url(personas)}{task.id}/"))
    row = re.search(rf'<li id="event-{seq}"[^>]*>(.*?)</li>', page, re.S).group(1)
    assert "progress.step" in row and "step 0 shell.run" in row and "alpha" in row


# --- artifacts ---------------------------------------------------------------------------


def upload(personas, task, name, data: bytes, content_type: str, kind="file"):
    return artifact_create(
        task=task,
        name=name,
        upload=io.BytesIO(data),
        content_type=content_type,
        kind=kind,
        actor=personas.member,
    )


def test_markdown_is_rendered_and_sanitized():
    out = render_markdown(
        "# Title\n\n<script>alert('x')</script>\n\n[link](javascript:alert(1)) "
        '<img src=x onerror="alert(2)">\n\n| a | b |\n|---|---|\n| 1 | 2 |\n'
    )
    assert "<h1>Title</h1>" in out and "<td>1</td>" in out
    assert "<script" not in out and "alert('x')" not in out
    assert "javascript:" not in out and "onerror" not in out


def test_artifact_previews_on_the_task_page(personas):
    task = new_task(personas)
    md = upload(
        personas, task, "notes.md", b"# Notes\n<script>alert(1)</script>\n*ok*", "text/markdown"
    )
    rows = "\n".join(f"{i},item {i}" for i in range(70))
    csv = upload(personas, task, "data.csv", f"n,name\n{rows}\n".encode(), "text/csv")
    site = upload(personas, task, "site.html", b"<h1>Hi</h1><script>steal()</script>", "text/html")
    png = upload(personas, task, "shot.png", b"\x89PNG\r\n\x1a\nfake", "image/png")
    blob = upload(personas, task, "blob.bin", b"\x00\x01", "application/octet-stream")

    page = html(client_for(personas.viewer).get(f"{board_url(personas)}{task.id}/"))
    section = page[page.index('id="artifacts"') :]

    def article(artifact) -> str:
        start = section.index(f'id="artifact-{artifact.id}"')
        return section[start : section.index("</article>", start)]

    markdown = article(md)
    assert "<h1>Notes</h1>" in markdown and "<em>ok</em>" in markdown
    assert "<script" not in markdown and "alert(1)" not in markdown
    table = article(csv)
    assert "<th>n</th><th>name</th>" in table and "<td>item 48</td>" in table
    assert "item 49" not in table and "beginning only" in table
    iframe = article(site)
    assert '<iframe class="preview preview-html" sandbox=""' in iframe
    assert "allow-scripts" not in iframe and "&lt;script&gt;steal()" in iframe
    assert f'src="{board_url(personas)}{task.id}/artifacts/{png.id}/?inline=1"' in article(png)
    assert 'data-preview="download"' in article(blob)


def test_xlsx_preview_shows_the_first_rows(personas):
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(["city", "people"])
    for i in range(60):
        sheet.append([f"c{i}", i])
    data = io.BytesIO()
    book.save(data)
    task = new_task(personas)
    xlsx = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    upload(personas, task, "cities.xlsx", data.getvalue(), xlsx, kind="spreadsheet")

    page = html(client_for(personas.viewer).get(f"{board_url(personas)}{task.id}/"))
    assert "<th>city</th><th>people</th>" in page and "<td>c48</td>" in page
    assert "<td>c49</td>" not in page


XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
SHARED_STRINGS = "application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"
SPREADSHEET = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"


def xlsx_bomb(strings: int) -> bytes:
    """A valid workbook whose shared-strings table holds `strings` entries: a few hundred
    KB packed, tens of MB unpacked."""
    from openpyxl import Workbook

    plain = io.BytesIO()
    Workbook().save(plain)
    packed = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(plain.getvalue())) as source,
        zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as bomb,
    ):
        for part in source.infolist():
            data = source.read(part.filename)
            if part.filename == "[Content_Types].xml":
                override = (
                    f'<Override PartName="/xl/sharedStrings.xml" ContentType="{SHARED_STRINGS}"/>'
                )
                data = data.replace(b"</Types>", override.encode() + b"</Types>")
            bomb.writestr(part.filename, data)
        table = "<si><t>x</t></si>" * strings
        bomb.writestr("xl/sharedStrings.xml", f'<sst xmlns="{SPREADSHEET}">{table}</sst>')
    return packed.getvalue()


def test_an_xlsx_zip_bomb_is_not_previewed_and_the_page_answers_fast(personas):
    data = xlsx_bomb(500_000)
    assert len(data) < 100_000  # 8.5 MB unpacked
    task = new_task(personas)
    bomb = upload(personas, task, "bomb.xlsx", data, XLSX, kind="spreadsheet")

    started = time.monotonic()
    page = html(client_for(personas.viewer).get(f"{board_url(personas)}{task.id}/"))

    assert time.monotonic() - started < 5
    section = page[page.index(f'id="artifact-{bomb.id}"') :]
    assert "Preview unavailable: too large." in section[: section.index("</article>")]


def test_a_built_preview_is_served_from_the_cache(personas, monkeypatch):
    from apps.dashboard import previews

    calls = []
    parse = previews.xlsx_rows
    monkeypatch.setattr(previews, "xlsx_rows", lambda data: calls.append(1) or parse(data))
    book = io.BytesIO()
    __import__("openpyxl").Workbook().save(book)
    task = new_task(personas)
    upload(personas, task, "a.xlsx", book.getvalue(), XLSX, kind="spreadsheet")
    viewer = client_for(personas.viewer)

    for _ in range(3):
        assert viewer.get(f"{board_url(personas)}{task.id}/").status_code == 200

    assert len(calls) == 1


def test_the_artifact_download_is_for_members_and_inline_only_for_images(personas):
    task = new_task(personas)
    png = upload(personas, task, "shot.png", b"\x89PNGfake", "image/png")
    site = upload(personas, task, "site.html", b"<script>x()</script>", "text/html")
    base = f"{board_url(personas)}{task.id}/artifacts/"
    viewer = client_for(personas.viewer)

    image = viewer.get(f"{base}{png.id}/?inline=1")
    assert image.status_code == 200 and image["Content-Type"] == "image/png"
    assert not image["Content-Disposition"].startswith("attachment")
    page = viewer.get(f"{base}{site.id}/?inline=1")
    assert page["Content-Disposition"].startswith("attachment")
    assert page["Content-Type"] == "application/octet-stream"
    assert b"".join(page.streaming_content) == b"<script>x()</script>"
    assert client_for(personas.outsider).get(f"{base}{png.id}/").status_code == 404


# --- live renderers ----------------------------------------------------------------------


def live(personas, page: str, events, role="member", resync=False, **params) -> list[str]:
    ctx = LiveContext(
        user=personas.member,
        group=personas.group,
        role=role,
        params={k: str(v) for k, v in params.items()},
        events=list(events),
        resync=resync,
    )
    return PAGES[page](ctx)


def test_the_task_renderer_appends_a_progress_event_and_refreshes_the_status(personas):
    task = new_task(personas)
    attempt = run(task, personas.agent)
    seq = attempt_progress(
        attempt_id=attempt.id,
        agent=personas.agent,
        epoch=attempt.epoch,
        kind="log",
        payload={"message": "compiling <stuff>"},
    )
    event = Event.objects.get(group=personas.group, seq=seq)

    out = "".join(live(personas, "task", [event], task=task.id))

    assert f'<div hx-swap-oob="beforeend:#event-stream"><li id="event-{seq}"' in out
    assert "compiling &lt;stuff&gt;" in out
    assert re.search(r'id="task-status"[^>]*hx-swap-oob="true"[^>]*>running<', out)
    assert 'id="attempt-timeline"' in out
    assert 'id="task-graph"' not in out  # a progress event changes no status
    assert live(personas, "task", [event], task=task.id + 999) == []


def test_the_task_renderer_redraws_everything_on_resync(personas):
    task = new_task(personas)
    out = "".join(live(personas, "task", [], resync=True, task=task.id))
    for element in (
        "task-status",
        "task-actions",
        "attempt-timeline",
        "event-stream",
        "artifacts",
        "task-graph",
    ):
        assert re.search(rf'id="{element}"[^>]*hx-swap-oob="true"', out), element


def test_the_board_renderer_moves_a_card_to_its_new_column(personas):
    task = new_task(personas, "Mover")
    run(task, personas.agent)
    events = list(Event.objects.filter(task=task).order_by("seq"))

    out = live(personas, "board", events)

    assert out[0] == f'<div id="task-card-{task.id}" hx-swap-oob="delete"></div>'
    assert out[1].startswith('<div hx-swap-oob="afterbegin:#board-list-running"><article')
    assert f'id="task-card-{task.id}"' in out[1] and "alpha @ alpha-device" in out[1]
    joined = "".join(out)
    assert re.search(r'id="board-count-running" class="count" hx-swap-oob="true">1<', joined)
    assert re.search(r'id="board-count-ready" class="count" hx-swap-oob="true">0<', joined)
    # A filtered board does not show cards that are filtered out, and a progress event
    # touches no card.
    filtered = live(personas, "board", events, toolkit="browser")
    assert "afterbegin" not in "".join(filtered)
    progress = Event(group=personas.group, seq=999, kind="progress.log", task=task)
    assert live(personas, "board", [progress]) == []
    assert 'id="task-board"' in "".join(live(personas, "board", [], resync=True))


# --- query counts ------------------------------------------------------------------------


def populate(personas, n: int, root: Task) -> None:
    """n tasks in the group, half of them sub-tasks of `root` depending on their
    predecessor, every fifth one run by the agent, each with two progress events."""
    agent = make_agent(personas.group, f"worker{n}", capacity=1000)
    previous = None
    for i in range(n):
        task = new_task(
            personas,
            f"t{i}",
            parent_id=root.id if i % 2 else None,
            depends_on=[previous.id] if previous and i % 2 else None,
        )
        if i % 2:
            previous = task
        if i % 5 == 0 and task.status == TaskStatus.READY:
            attempt = run(task, agent)
            for k in range(2):
                attempt_progress(
                    attempt_id=attempt.id,
                    agent=agent,
                    epoch=attempt.epoch,
                    kind="log",
                    payload={"message": f"line {k}"},
                )


def count_queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured.captured_queries)


@pytest.mark.parametrize("page", ["board", "detail", "create", "filtered"])
def test_page_queries_do_not_grow_with_the_group(personas, toolkits, page):
    root = new_task(personas, "Root")
    client = client_for(personas.member)
    url = {
        "board": board_url(personas),
        "filtered": board_url(personas)
        + f"?toolkit=shell&agent={personas.agent.id}&parent={root.id}",
        "detail": f"{board_url(personas)}{root.id}/",
        "create": f"{board_url(personas)}new/",
    }[page]
    upload(personas, root, "a.md", b"# a", "text/markdown")
    populate(personas, 10, root)
    small = count_queries(client, url)
    populate(personas, 190, root)
    large = count_queries(client, url)
    assert small == large, (small, large)
    assert large <= 20  # session, user, nav badge, group, role, live seq, and the page


def test_renderer_queries_do_not_grow_with_the_events(personas):
    root = new_task(personas, "Root")
    populate(personas, 10, root)
    few = list(Event.objects.filter(group=personas.group).order_by("seq"))[-3:]
    populate(personas, 60, root)
    many = list(Event.objects.filter(group=personas.group).order_by("seq"))

    def queries(page: str, events, **params) -> int:
        with CaptureQueriesContext(connection) as captured:
            live(personas, page, events, **params)
        return len(captured.captured_queries)

    events_of_root = [e for e in many if e.task_id == root.id]
    assert queries("task", few + events_of_root, task=root.id) == queries(
        "task", many, task=root.id
    )
    assert queries("board", few) == queries("board", many[:90])
