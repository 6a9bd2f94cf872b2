"""Document → skill (apps.devices.skills): a document uploaded to a toolkit becomes a skill
through the model — the scripted OpenAI-compatible server (tests/llm_server.py) in its own
process, reached through the real openai SDK — people edit it into new versions, and agents
get the current one in the task spec of tasks that require the toolkit."""

import io
import json
import re
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from apps.checkpoints.models import Checkpoint, CheckpointKind
from apps.dashboard.live import PAGES, LiveContext
from apps.devices.models import SkillStatus, Toolkit, ToolkitSkill
from apps.devices.selectors import assignment_frame, welcome_frame
from apps.devices.skills import MAX_SKILL_CHARS, skill_edit, skill_generate, skills_current
from apps.events.models import Event
from apps.groups.models import Group
from apps.llm.models import ModelCall
from apps.tasks.services import task_assign, task_create
from claw import protocol
from tests.llm_server import LLMServer
from tests.test_api_support import API, assert_error, body, client_for, send

pytestmark = pytest.mark.django_db

SHELL_SKILLS = "/groups/research/toolkits/shell/skills"

RUNBOOK = b"""# Deploying

Run `make test` first. Then `make deploy`. Never deploy on Fridays.
Check the dashboard shows the new version.
"""

SKILL = {
    "summary": "How to deploy the service.",
    "procedure": ["Run `make test`.", "Run `make deploy`."],
    "checklist": ["The dashboard shows the new version."],
    "constraints": ["Never deploy on Fridays."],
}
RENDERED = """How to deploy the service.

### Procedure
1. Run `make test`.
2. Run `make deploy`.

### Checklist
- The dashboard shows the new version.

### Constraints
- Never deploy on Fridays."""


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
def generated(monkeypatch):
    """claw.skill_generate runs at once, in this process, when the upload commits."""
    ran = []
    monkeypatch.setattr(
        "apps.devices.tasks.skill_generate_task.delay",
        lambda skill_id: ran.append(skill_generate(skill_id=skill_id)),
    )
    return ran


def answer(skill) -> dict:
    return {"content": json.dumps(skill), "reasoning_content": "Reading the runbook."}


def upload(capture, user, content=RUNBOOK, *, name="runbook.md", group="research", kit="shell"):
    client = client_for(user)
    with capture(execute=True):
        return client.post(
            f"{API}/groups/{group}/toolkits/{kit}/skills/documents",
            {"file": SimpleUploadedFile(name, content)},
        )


def skills(group=None) -> list[ToolkitSkill]:
    query = ToolkitSkill.objects.order_by("group_id", "toolkit_id", "version")
    return list(query.filter(group=group) if group else query)


def kinds(group) -> list[str]:
    return list(
        Event.objects.filter(group=group, kind__startswith="skill.")
        .order_by("seq")
        .values_list("kind", flat=True)
    )


def tiny_pdf(*lines: str) -> bytes:
    """A minimal valid one-page PDF whose text is `lines` (Helvetica, one per line)."""
    shown = " ".join(
        "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") '"
        for line in lines
    )
    stream = f"BT /F1 12 Tf 72 720 Td 14 TL {shown} ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        "/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n".encode()
    return out + f"startxref\n{xref}\n%%EOF\n".encode()


# --- from a document to a skill -------------------------------------------------------------


def test_an_uploaded_markdown_document_becomes_skill_v1_through_the_model(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script(answer(SKILL))

    response = upload(django_capture_on_commit_callbacks, personas.owner)

    assert response.status_code == 202, response.content
    pending = body(response)
    assert (pending["version"], pending["status"], pending["source"]) == (1, "pending", "document")
    assert pending["document_name"] == "runbook.md" and pending["document_size"] == len(RUNBOOK)
    assert generated == ["ready"]
    [skill] = skills(personas.group)
    assert (skill.version, skill.status, skill.error) == (1, SkillStatus.READY, "")
    assert skill.text == RENDERED
    assert skill.usage and skill.usage[0]["completion_tokens"] > 0
    assert skills_current(group_id=personas.group.id, slugs=["shell"]) == {"shell": RENDERED}
    assert kinds(personas.group) == ["skill.uploaded", "skill.ready"]
    # What the model was asked: a streamed chat with the skill's JSON schema; the document
    # is in the prompt, whole.
    [sent] = llm.requests()
    assert sent["model"] == "kimi-k2.6" and sent["stream"] is True
    assert sent["response_format"]["type"] == "json_schema"
    schema = sent["response_format"]["json_schema"]["schema"]
    assert set(schema["required"]) == {"summary", "procedure", "checklist", "constraints"}
    assert "`shell`" in sent["messages"][0]["content"]
    assert RUNBOOK.decode() in sent["messages"][1]["content"]
    assert "cut" not in sent["messages"][1]["content"]
    # The API lists it; anyone in the group may read it.
    [listed] = body(send(client_for(personas.viewer), "GET", SHELL_SKILLS))
    assert (listed["version"], listed["status"], listed["text"]) == (1, "ready", RENDERED)
    toolkits = body(send(client_for(personas.viewer), "GET", "/groups/research/toolkits"))
    assert {"slug": "shell", "skill": RENDERED} in toolkits
    assert {"slug": "python", "skill": ""} in toolkits  # alpha declares it: no skill yet


def test_a_pdf_upload_reaches_the_model_as_text(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script(answer(SKILL))
    pdf = tiny_pdf("Rotate the API keys every month.", "Never print a key.")

    response = upload(django_capture_on_commit_callbacks, personas.owner, pdf, name="Keys.PDF")

    assert response.status_code == 202, response.content
    assert generated == ["ready"]
    prompt = llm.requests()[0]["messages"][1]["content"]
    assert "Rotate the API keys every month.\nNever print a key." in prompt
    assert "Keys.PDF" in prompt
    [skill] = skills(personas.group)
    assert skill.document_size == len(pdf) and len(skill.document_sha256) == 64


def test_a_long_document_is_cut_and_the_prompt_says_so(
    personas, llm, generated, django_capture_on_commit_callbacks, monkeypatch
):
    monkeypatch.setattr("apps.devices.skills.MAX_DOCUMENT_CHARS", 40)
    llm.script(answer(SKILL))

    upload(django_capture_on_commit_callbacks, personas.owner)

    prompt = llm.requests()[0]["messages"][1]["content"]
    assert f"({len(RUNBOOK.decode().strip())} characters; it was cut to its first 40" in prompt
    assert "Never deploy on Fridays" not in prompt


def test_an_invalid_skill_is_retried_once_with_the_error(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script({"content": json.dumps({**SKILL, "procedure": []})}, answer(SKILL))

    upload(django_capture_on_commit_callbacks, personas.owner)

    assert generated == ["ready"]
    first, second = llm.requests()
    assert len(second["messages"]) == len(first["messages"]) + 2
    assert second["messages"][-1]["content"].startswith("That skill is invalid: procedure must")
    assert skills(personas.group)[0].text == RENDERED


def test_two_invalid_answers_fail_the_version_with_the_error_visible(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script({"content": "Sure! Step 1: deploy."}, {"content": ""})

    upload(django_capture_on_commit_callbacks, personas.owner)

    assert generated == ["failed"]
    assert len(llm.requests()) == 2
    [skill] = skills(personas.group)
    assert skill.status == SkillStatus.FAILED and skill.text == ""
    assert "empty" in skill.error
    assert kinds(personas.group) == ["skill.uploaded", "skill.failed"]
    failed = Event.objects.get(group=personas.group, kind="skill.failed")
    assert failed.payload["error"] == skill.error and failed.payload["version"] == 1
    [listed] = body(send(client_for(personas.viewer), "GET", SHELL_SKILLS))
    assert (listed["status"], listed["error"]) == ("failed", skill.error)
    assert skills_current(group_id=personas.group.id, slugs=["shell"]) == {}
    # Generating it again changes nothing: a failed version is not made again.
    assert skill_generate(skill_id=skill.id) == "skipped"
    assert len(llm.requests()) == 2


def test_a_model_error_fails_the_version(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script({"status": 500, "error": "overloaded"})

    upload(django_capture_on_commit_callbacks, personas.owner)

    assert generated == ["failed"]
    assert "model call failed" in skills(personas.group)[0].error


def test_a_skill_is_charged_to_the_budget_and_not_made_once_it_is_used_up(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script({**answer(SKILL), "usage": {"prompt_tokens": 700, "completion_tokens": 300}})
    Group.objects.filter(id=personas.group.id).update(llm_token_budget=1000)

    upload(django_capture_on_commit_callbacks, personas.owner)
    upload(django_capture_on_commit_callbacks, personas.owner, name="second.md")

    assert generated == ["ready", "failed"]
    assert len(llm.requests()) == 1
    [call] = ModelCall.objects.filter(group=personas.group)
    assert (call.prompt_tokens, call.completion_tokens, call.device_id) == (700, 300, None)
    first, second = skills(personas.group)
    assert first.status == SkillStatus.READY
    assert "budget is used up (1,000 of 1,000 tokens)" in second.error
    assert Checkpoint.objects.filter(group=personas.group, kind=CheckpointKind.BUDGET).exists()


def test_a_ready_skill_is_not_made_again(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script(answer(SKILL))
    upload(django_capture_on_commit_callbacks, personas.owner)
    [skill] = skills(personas.group)

    assert skill_generate(skill_id=skill.id) == "skipped"

    assert len(llm.requests()) == 1
    assert kinds(personas.group) == ["skill.uploaded", "skill.ready"]


def test_without_a_model_uploads_are_refused_and_nothing_is_stored(
    personas, settings, generated, django_capture_on_commit_callbacks
):
    settings.CLAW_LLM_BASE_URL = ""

    response = upload(django_capture_on_commit_callbacks, personas.owner)

    assert_error(response, 503, "model_unavailable")
    assert skills() == [] and generated == []


# --- edits and versions ------------------------------------------------------------------------


def test_an_edit_makes_v2_and_v2_is_current(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    llm.script(answer(SKILL))
    upload(django_capture_on_commit_callbacks, personas.owner)

    response = send(
        client_for(personas.owner),
        "POST",
        SHELL_SKILLS,
        {"text": RENDERED + "\n- Tag the release.", "base_version": 1},
    )

    assert response.status_code == 201, response.content
    edited = body(response)
    assert (edited["version"], edited["source"], edited["status"]) == (2, "edit", "ready")
    current = skills_current(group_id=personas.group.id, slugs=["shell"])
    assert current == {"shell": RENDERED + "\n- Tag the release."}
    listed = body(send(client_for(personas.member), "GET", SHELL_SKILLS))
    assert [(v["version"], v["source"]) for v in listed] == [(2, "edit"), (1, "document")]
    assert kinds(personas.group) == ["skill.uploaded", "skill.ready", "skill.edited"]
    # An edit of a version that is no longer current is refused, with the current version.
    stale = send(
        client_for(personas.owner),
        "POST",
        SHELL_SKILLS,
        {"text": "old", "base_version": 1},
    )
    assert "now version 2" in assert_error(stale, 409, "skill_changed")["message"]
    # An empty edit clears the skill: agents get none.
    send(client_for(personas.owner), "POST", SHELL_SKILLS, {"text": ""})
    assert skills_current(group_id=personas.group.id, slugs=["shell"]) == {}
    assert [s.version for s in skills(personas.group)] == [1, 2, 3]


def test_a_skill_longer_than_the_cap_is_refused(personas):
    response = send(
        client_for(personas.owner),
        "POST",
        SHELL_SKILLS,
        {"text": "x" * (MAX_SKILL_CHARS + 1)},
    )
    assert "at most 12000 characters" in assert_error(response, 422, "too_long")["message"]
    assert skills() == []


def test_a_version_made_while_another_was_pending_keeps_the_numbering_and_latest_ready_wins(
    personas, llm, monkeypatch, django_capture_on_commit_callbacks
):
    # The upload's generation waits until after the edit: the edit is v2 and stays current.
    queued = []
    monkeypatch.setattr("apps.devices.tasks.skill_generate_task.delay", queued.append)
    upload(django_capture_on_commit_callbacks, personas.owner)
    skill_edit(actor=personas.owner, group=personas.group, toolkit=shell(), text="By hand.")
    llm.script(answer(SKILL))

    assert skill_generate(skill_id=queued[0]) == "ready"

    assert [(s.version, s.status) for s in skills(personas.group)] == [(1, "ready"), (2, "ready")]
    assert skills_current(group_id=personas.group.id, slugs=["shell"]) == {"shell": "By hand."}


def shell() -> Toolkit:
    return Toolkit.objects.get(slug="shell")


# --- who may, and who sees ---------------------------------------------------------------------


def test_another_group_does_not_see_a_groups_skill(personas):
    skill_edit(actor=personas.owner, group=personas.group, toolkit=shell(), text="Ours.")

    assert skills_current(group_id=personas.other_group.id, slugs=["shell"]) == {}
    # The outsider owns the other group: their own toolkits carry no skill, and ours are
    # not found for them.
    theirs = body(send(client_for(personas.outsider), "GET", "/groups/elsewhere/toolkits"))
    assert {"slug": "shell", "skill": ""} in theirs
    assert (
        body(send(client_for(personas.outsider), "GET", "/groups/elsewhere/toolkits/shell/skills"))
        == []
    )
    response = send(client_for(personas.outsider), "GET", SHELL_SKILLS)
    assert_error(response, 404, "not_found")
    # Their version numbering starts at 1.
    mine = skill_edit(
        actor=personas.outsider, group=personas.other_group, toolkit=shell(), text="Theirs."
    )
    assert mine.version == 1
    assert skills_current(group_id=personas.group.id, slugs=["shell"]) == {"shell": "Ours."}


@pytest.mark.parametrize("persona", ["viewer", "member", "approver"])
def test_only_owners_upload_or_edit(
    personas, llm, generated, django_capture_on_commit_callbacks, persona
):
    user = getattr(personas, persona)

    assert_error(upload(django_capture_on_commit_callbacks, user), 403, "forbidden")
    response = send(client_for(user), "POST", SHELL_SKILLS, {"text": "x"})
    assert_error(response, 403, "forbidden")

    assert skills() == [] and generated == [] and llm.requests() == []


def test_outsiders_cannot_upload_or_edit_or_learn_the_group_exists(
    personas, llm, generated, django_capture_on_commit_callbacks
):
    response = upload(django_capture_on_commit_callbacks, personas.outsider)
    assert_error(response, 404, "not_found")
    response = send(
        client_for(personas.outsider),
        "POST",
        SHELL_SKILLS,
        {"text": "x"},
    )
    assert_error(response, 404, "not_found")
    assert skills() == []


def test_an_unknown_toolkit_is_not_found(personas):
    response = send(client_for(personas.owner), "GET", "/groups/research/toolkits/nope/skills")
    assert_error(response, 404, "not_found")


def encrypted_pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=io.BytesIO(tiny_pdf("Secret.")))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def blank_pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "status", "code", "says"),
    [
        ("big.md", b"x" * (2 * 1024 * 1024 + 1), 413, "too_large", "2 MiB"),
        ("notes.docx", b"PK\x03\x04", 422, "unsupported_type", ".pdf"),
        ("script", b"echo hi", 422, "unsupported_type", "Markdown"),
        ("latin1.txt", "café".encode("latin-1"), 422, "unreadable_document", "UTF-8"),
        ("binary.md", b"a\x00b", 422, "unreadable_document", "binary"),
        ("blank.txt", b"  \n\n ", 422, "empty_document", "no text"),
        ("fake.pdf", b"hello", 422, "unreadable_document", "not a PDF"),
        ("broken.pdf", b"%PDF-1.4\ngarbage", 422, "unreadable_document", "could not be read"),
        ("locked.pdf", None, 422, "unreadable_document", "encrypted"),
        ("scan.pdf", None, 422, "empty_document", "scanned"),
    ],
)
def test_bad_documents_get_a_clear_error_and_store_nothing(
    personas, llm, generated, django_capture_on_commit_callbacks, name, content, status, code, says
):
    if content is None:
        content = encrypted_pdf() if name == "locked.pdf" else blank_pdf()

    response = upload(django_capture_on_commit_callbacks, personas.owner, content, name=name)

    assert says in assert_error(response, status, code)["message"]
    assert skills() == [] and generated == [] and llm.requests() == []
    assert kinds(personas.group) == []


# --- agents get it -------------------------------------------------------------------------------


def test_the_assignment_frame_carries_the_skill_for_tasks_that_require_the_toolkit(personas):
    skill_edit(actor=personas.owner, group=personas.group, toolkit=shell(), text="Use `set -e`.")
    skill_edit(
        actor=personas.outsider, group=personas.other_group, toolkit=shell(), text="Not yours."
    )
    needs_shell = task_create(
        group=personas.group,
        actor=personas.member,
        title="Build",
        required_toolkits=["shell", "python"],
    )
    needs_python = task_create(
        group=personas.group, actor=personas.member, title="Plot", required_toolkits=["python"]
    )
    first = task_assign(task_id=needs_shell.id, agent_id=personas.agent.id)
    personas.agent.capacity = 2
    personas.agent.save(update_fields=["capacity"])
    second = task_assign(task_id=needs_python.id, agent_id=personas.agent.id)

    frame = assignment_frame(attempt_id=first.id)
    assert frame.task.skills == {"shell": "Use `set -e`."}
    wire = json.loads(frame.model_dump_json())
    assert wire["task"]["skills"] == {"shell": "Use `set -e`."}
    assert protocol.SERVER_FRAMES.validate_json(frame.model_dump_json()).task.skills == {
        "shell": "Use `set -e`."
    }
    # A task that does not require the toolkit gets no skills field at all (frames stay what
    # agents built before the field existed accept).
    plain = json.loads(assignment_frame(attempt_id=second.id).model_dump_json())
    assert "skills" not in plain["task"]
    # A reconnecting agent gets the same in its welcome's owned attempts.
    welcome = welcome_frame(
        agent_id=personas.agent.id,
        re="h",
        version=1,
        limits=protocol.Limits(max_frame_bytes=1, rate_per_s=1, burst=1),
    )
    assert [a.task.skills for a in welcome.owned] == [{"shell": "Use `set -e`."}, {}]


def test_skills_past_the_task_spec_budget_are_left_out(personas):
    python = Toolkit.objects.get(slug="python")
    skill_edit(actor=personas.owner, group=personas.group, toolkit=python, text="Use 3.11.")
    skill_edit(actor=personas.owner, group=personas.group, toolkit=shell(), text="Use set -e.")

    found = skills_current(group_id=personas.group.id, slugs=["python", "shell"], budget=10)

    assert found == {"python": "Use 3.11."}


# --- the dashboard --------------------------------------------------------------------------------


def page(client, url="/g/research/toolkits/"):
    response = client.get(url)
    return response, response.content.decode()


def test_the_toolkits_page_shows_the_current_skill_as_safe_markdown_and_its_versions(
    personas, client, llm
):
    skill_edit(
        actor=personas.owner,
        group=personas.group,
        toolkit=shell(),
        text="### Procedure\n1. Run `make`.\n\n<script>alert(1)</script>",
    )
    client.force_login(personas.viewer)

    response, html = page(client)

    assert response.status_code == 200
    assert 'id="nav-toolkits" href="/g/research/toolkits/"' in html
    assert 'ws-connect="/ws/live/?page=toolkits&amp;group=research"' in html
    current = re.search(r'id="skill-shell-current">(.*?)</div>', html, re.S).group(1)
    assert "<h3>Procedure</h3>" in current and "<code>make</code>" in current
    assert "<script>" not in html.split('id="skill-shell-versions"')[0].split("<main>")[1]
    assert 'id="skill-shell-v1"' in html
    assert 'id="toolkit-python"' in html  # declared by the group's agent, no skill yet
    # Viewers read only.
    assert 'id="skill-shell-upload-form"' not in html and 'id="skill-shell-edit"' not in html
    client.force_login(personas.owner)
    _, html = page(client)
    assert 'id="skill-shell-upload-form"' in html and 'id="skill-shell-edit"' in html


def test_outsiders_get_404_for_the_toolkits_page_and_its_forms(personas, client):
    client.force_login(personas.outsider)
    assert client.get("/g/research/toolkits/").status_code == 404
    assert client.post("/g/research/toolkits/shell/skill/", {"text": "x"}).status_code == 404
    response = client.post(
        "/g/research/toolkits/shell/documents/",
        {"document": SimpleUploadedFile("a.md", b"# A")},
    )
    assert response.status_code == 404
    assert skills() == []


@pytest.mark.parametrize("persona", ["viewer", "member"])
def test_low_roles_cannot_upload_or_edit_in_the_dashboard(personas, client, llm, persona):
    client.force_login(getattr(personas, persona))
    assert client.post("/g/research/toolkits/shell/skill/", {"text": "x"}).status_code == 403
    response = client.post(
        "/g/research/toolkits/shell/documents/",
        {"document": SimpleUploadedFile("a.md", b"# A")},
    )
    assert response.status_code == 403
    assert skills() == []


def test_an_upload_in_the_dashboard_shows_generating_then_the_live_page_shows_the_skill(
    personas, client, llm, monkeypatch, django_capture_on_commit_callbacks
):
    queued = []
    monkeypatch.setattr("apps.devices.tasks.skill_generate_task.delay", queued.append)
    client.force_login(personas.owner)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/g/research/toolkits/shell/documents/",
            {"document": SimpleUploadedFile("runbook.md", RUNBOOK)},
            follow=True,
        )
    html = response.content.decode()
    assert "K2.6 is turning it into the shell skill (version 1)" in html
    assert 'id="skill-shell-pending-1"' in html and "generating…" in html
    seen = Group.objects.get(id=personas.group.id).event_seq

    llm.script(answer(SKILL))
    assert skill_generate(skill_id=queued[0]) == "ready"

    group = Group.objects.get(id=personas.group.id)
    events = list(Event.objects.filter(group=group, seq__gt=seen).order_by("seq"))
    fragments = PAGES["toolkits"](
        LiveContext(user=personas.owner, group=group, role="owner", params={}, events=events)
    )
    shell_fragment = next(f for f in fragments if 'id="skill-shell"' in f)
    assert 'hx-swap-oob="true"' in shell_fragment
    assert "pending-1" not in shell_fragment and "<h3>Procedure</h3>" in shell_fragment
    # Events that do not concern skills redraw nothing.
    task = task_create(group=group, actor=personas.member, title="T")
    other = list(Event.objects.filter(task=task))
    assert (
        PAGES["toolkits"](
            LiveContext(user=personas.owner, group=group, role="owner", params={}, events=other)
        )
        == []
    )


def test_a_refused_dashboard_upload_explains_why(personas, client, llm):
    client.force_login(personas.owner)
    response = client.post(
        "/g/research/toolkits/shell/documents/",
        {"document": SimpleUploadedFile("notes.docx", b"PK")},
        follow=True,
    )
    assert "notes.docx: Upload a Markdown" in response.content.decode()
    assert skills() == []


def test_editing_in_the_dashboard_saves_a_new_version_and_keeps_text_on_a_conflict(
    personas, client
):
    client.force_login(personas.owner)
    _, html = page(client, "/g/research/toolkits/?edit=shell")
    assert 'id="skill-shell-edit-form"' in html and 'name="base_version" value="0"' in html

    response = client.post(
        "/g/research/toolkits/shell/skill/", {"text": "First.", "base_version": "0"}
    )
    assert response.status_code == 302
    assert skills_current(group_id=personas.group.id, slugs=["shell"]) == {"shell": "First."}

    # Someone saved meanwhile: the page comes back with the text as typed and the new base.
    response = client.post(
        "/g/research/toolkits/shell/skill/", {"text": "Mine.", "base_version": "0"}
    )
    html = response.content.decode()
    assert response.status_code == 409
    assert "Someone saved version 1 of the shell skill meanwhile" in html
    assert "Mine.</textarea>" in html
    assert 'name="base_version" value="1"' in html
    response = client.post(
        "/g/research/toolkits/shell/skill/", {"text": "Mine.", "base_version": "1"}
    )
    assert response.status_code == 302
    assert skills_current(group_id=personas.group.id, slugs=["shell"]) == {"shell": "Mine."}


def test_a_generation_lost_long_ago_is_shown_as_never_finished(
    personas, client, llm, monkeypatch, django_capture_on_commit_callbacks
):
    monkeypatch.setattr("apps.devices.tasks.skill_generate_task.delay", lambda skill_id: None)
    upload(django_capture_on_commit_callbacks, personas.owner)
    client.force_login(personas.viewer)
    assert "generating…" in page(client)[1]

    ToolkitSkill.objects.update(created_at=timezone.now() - timedelta(minutes=30))

    html = page(client)[1]
    assert "generating…" not in html and "was never finished" in html
