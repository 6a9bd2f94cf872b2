"""Plan review in the dashboard: a plan checkpoint's proposal on the approvals page and on
the goal task's page, its editor (plan_edit's rule: member+, while pending and undecided),
errors shown with what was typed, stale and concurrent edits, and the live redraws."""

from html.parser import HTMLParser

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.utils.html import escape

from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointSource
from apps.checkpoints.services import checkpoint_raise
from apps.dashboard.live import PAGES, LiveContext
from apps.events.models import Event
from apps.tasks.models import Task
from apps.tasks.planner import known_toolkits, plan_edit, plan_validate
from apps.tasks.services import task_create

PLAN = {
    "summary": "Measure, then write.",
    "tasks": [
        {
            "key": "measure",
            "title": "Measure latency",
            "instructions": "Run the load test.\nTwice.",
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


@pytest.fixture
def goal(personas):
    return task_create(
        group=personas.group,
        actor=personas.member,
        title="Publish a benchmark report",
        required_toolkits=["shell"],
    )


@pytest.fixture
def plan(personas, goal):
    """A pending plan checkpoint, raised the way the planner raises one."""
    proposal = plan_validate(PLAN, toolkits=known_toolkits())
    return checkpoint_raise(
        group=personas.group,
        task=goal,
        source=CheckpointSource.PLANNER,
        kind=CheckpointKind.PLAN,
        title=f"Plan for task #{goal.id}: {goal.title}",
        details=proposal["summary"],
        proposal=proposal,
    )


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def task_page(goal) -> str:
    return f"/g/research/tasks/{goal.id}/"


def plan_page(checkpoint, slug="research") -> str:
    return f"/g/{slug}/checkpoints/{checkpoint.id}/plan/"


class _FormFields(HTMLParser):
    """The fields a browser would submit from one form: inputs (checked checkboxes only)
    and textareas (without the newline that follows the opening tag)."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id, self.inside, self.textarea = form_id, False, None
        self.fields: dict[str, str] = {}
        self.found = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and attrs.get("id") == self.form_id:
            self.inside = self.found = True
        if not self.inside:
            return
        if tag == "input" and attrs.get("name"):
            if attrs.get("type") != "checkbox" or "checked" in attrs:
                self.fields[attrs["name"]] = attrs.get("value") or ""
        elif tag == "textarea":
            self.textarea = attrs["name"]
            self.fields[self.textarea] = ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "textarea" and self.textarea:
            self.fields[self.textarea] = self.fields[self.textarea].removeprefix("\n")
            self.textarea = None

    def handle_data(self, data):
        if self.textarea:
            self.fields[self.textarea] += data


def editor_fields(html: str, checkpoint) -> dict[str, str] | None:
    parser = _FormFields(f"plan-form-{checkpoint.id}")
    parser.feed(html)
    return parser.fields if parser.found else None


def html(response) -> str:
    return response.content.decode()


def proposal_of(checkpoint) -> dict:
    return Checkpoint.objects.get(id=checkpoint.id).proposal


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


HTMX = {"HTTP_HX_REQUEST": "true"}


# --- showing a plan ----------------------------------------------------------------------


def test_the_approvals_page_shows_a_pending_plans_tasks(personas, plan):
    page = html(client_for(personas.approver).get("/approvals/"))

    assert f'id="plan-{plan.id}"' in page
    assert "Measure, then write." in page
    for title in ("Measure latency", "Chart the numbers", "Write the report"):
        assert title in page
    assert "after: measure, chart" in page and "after: measure<" in page
    assert '<span class="chip">python</span>' in page
    assert "names the p99" in page and "Run the load test.<br>Twice." in page
    # Approvers may edit (plan_edit: member+), and decide with the usual buttons.
    assert f'id="plan-form-{plan.id}"' in page and f'id="approve-{plan.id}"' in page


def test_the_task_page_shows_the_plan_with_its_status(personas, goal, plan):
    member = html(client_for(personas.member).get(task_page(goal)))
    viewer = html(client_for(personas.viewer).get(task_page(goal)))
    bare = task_create(group=personas.group, actor=personas.member, title="No plan here")

    assert 'id="task-plan-review"' in member and "Chart the numbers" in member
    assert f'id="plan-form-{plan.id}"' in member
    assert "Chart the numbers" in viewer and f'id="plan-form-{plan.id}"' not in viewer
    assert '<section id="task-plan-review" class="card task-plan" hidden>' in html(
        client_for(personas.member).get(task_page(bare))
    )


def test_proposal_text_is_escaped(personas, goal, plan):
    hostile = {
        "summary": "<img src=x onerror=alert(1)>",
        "tasks": [{"key": "x", "title": "<script>alert(1)</script>", "instructions": "<b>hi"}],
    }
    plan_edit(actor=personas.member, checkpoint=plan, proposal=hostile)

    for page in (
        html(client_for(personas.approver).get("/approvals/")),
        html(client_for(personas.member).get(task_page(goal))),
    ):
        assert "<script>alert(1)</script>" not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;hi" in page


# --- editing -----------------------------------------------------------------------------


def test_a_member_edits_a_title_and_a_dependency(personas, goal, plan):
    client = client_for(personas.member)
    fields = editor_fields(html(client.get(task_page(goal))), plan)
    assert fields["task-0-instructions"] == "Run the load test.\nTwice."
    fields["task-1-title"] = "Chart p50 and p99"
    fields["task-2-depends_on"] = "chart"

    response = client.post(plan_page(plan), fields, **HTMX)

    assert response.status_code == 200
    block = html(response)
    assert block.startswith(f'<div id="plan-{plan.id}" class="plan"')
    assert "Saved the plan: 3 tasks." in block and "Chart p50 and p99" in block
    proposal = proposal_of(plan)
    assert [t["title"] for t in proposal["tasks"]] == [
        "Measure latency",
        "Chart p50 and p99",
        "Write the report",
    ]
    assert proposal["tasks"][2]["depends_on"] == ["chart"]
    # Nothing else changed on the way through the form.
    assert proposal["tasks"][0] == PLAN["tasks"][0]
    assert proposal["tasks"][2]["acceptance_criteria"] == ["under 2 pages", "names the p99"]
    [edited] = Event.objects.filter(kind="plan.edited", task=goal)
    assert edited.actor_id == personas.member.pk and edited.payload["checkpoint_id"] == plan.id


def test_without_javascript_a_saved_edit_goes_back_where_it_came_from(personas, goal, plan):
    client = client_for(personas.approver)
    fields = editor_fields(html(client.get("/approvals/")), plan)
    fields["summary"] = "Measure, chart, write."

    response = client.post(plan_page(plan), fields)

    assert response.status_code == 302 and response["Location"] == "/approvals/"
    assert messages_of(response) == ["Saved the plan: 3 tasks."]
    assert proposal_of(plan)["summary"] == "Measure, chart, write."
    page = html(client.get("/approvals/"))
    assert "Measure, chart, write." in page and "Measure, then write." not in page


def test_a_task_is_removed_and_one_added_from_the_blank_row(personas, goal, plan):
    client = client_for(personas.member)
    fields = editor_fields(html(client.get(task_page(goal))), plan)
    fields["task-1-remove"] = "1"
    fields["task-2-depends_on"] = "measure"
    fields["task-2-instructions"] = "Summarize\r\nthe findings."  # as browsers send it
    fields.update(
        {
            "task-3-title": "Review the report",
            "task-3-toolkits": "llm, documents",
            "task-3-depends_on": "write",
            "task-3-criteria": "typos fixed\n\n  numbers checked  ",
        }
    )

    response = client.post(plan_page(plan), fields, **HTMX)

    assert "Saved the plan: 3 tasks." in html(response)
    tasks = proposal_of(plan)["tasks"]
    assert [t["key"] for t in tasks] == ["measure", "write", "t1"]
    assert tasks[1]["instructions"] == "Summarize\nthe findings."
    assert tasks[2] == {
        "key": "t1",
        "title": "Review the report",
        "instructions": "",
        "required_toolkits": ["documents", "llm"],
        "depends_on": ["write"],
        "acceptance_criteria": ["typos fixed", "numbers checked"],
    }


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        (
            "task-1-toolkits",
            "python teleport",
            "Task 2 (chart) requires unknown toolkit(s) teleport",
        ),
        (
            "task-0-depends_on",
            "write",
            "The dependencies make a cycle among: chart, measure, write",
        ),
        (
            "task-1-remove",
            "1",
            "Task 3 (write) depends on 'chart', which is not a task of this plan",
        ),
        ("task-2-title", "   ", "Task 3 title must not be empty"),
    ],
)
@pytest.mark.parametrize("htmx", [True, False])
def test_a_refused_edit_shows_the_error_keeps_what_was_typed_and_changes_nothing(
    personas, goal, plan, field, value, says, htmx
):
    client = client_for(personas.member)
    fields = editor_fields(html(client.get(task_page(goal))), plan)
    fields["task-0-title"] = "Measure latency twice"  # typed alongside the mistake
    fields[field] = value

    response = client.post(plan_page(plan), fields, **(HTMX if htmx else {}))

    assert response.status_code == (200 if htmx else 422)
    page = html(response)
    assert escape(says) in page and f'id="plan-error-{plan.id}" role="alert"' in page
    assert f'class="plan-editor" id="plan-editor-{plan.id}" open' in page
    kept = editor_fields(page, plan)
    assert kept["task-0-title"] == "Measure latency twice" and kept[field] == value
    assert 'class="plan-row has-error"' in page
    assert proposal_of(plan) == plan_validate(PLAN, toolkits=known_toolkits())
    assert not Event.objects.filter(kind="plan.edited").exists()


def test_removing_every_task_is_refused(personas, goal, plan):
    client = client_for(personas.member)
    fields = editor_fields(html(client.get(task_page(goal))), plan)
    fields.update({f"task-{n}-remove": "1" for n in range(3)})

    response = client.post(plan_page(plan), fields, **HTMX)

    assert "A plan needs at least one task; to drop the plan, reject it instead." in html(response)
    assert len(proposal_of(plan)["tasks"]) == 3


def test_too_many_tasks_are_refused(personas, goal, plan):
    client = client_for(personas.member)
    fields = editor_fields(html(client.get(task_page(goal))), plan)
    fields["rows"] = "52"
    for n in range(3, 52):
        fields[f"task-{n}-title"] = f"Step {n}"

    response = client.post(plan_page(plan), fields, **HTMX)

    assert "A plan has at most 50 tasks (this one has 52)." in html(response)
    assert len(proposal_of(plan)["tasks"]) == 3


# --- who may edit ------------------------------------------------------------------------


def test_a_viewer_gets_no_form_and_a_forged_post_is_refused(personas, goal, plan):
    owner_fields = editor_fields(html(client_for(personas.owner).get(task_page(goal))), plan)
    owner_fields["task-0-title"] = "Forged"
    viewer = client_for(personas.viewer)

    page = html(viewer.get(plan_page(plan)))
    forged = viewer.post(plan_page(plan), owner_fields, **HTMX)

    assert "Measure latency" in page and f'id="plan-form-{plan.id}"' not in page
    assert forged.status_code == 403
    assert proposal_of(plan)["tasks"][0]["title"] == "Measure latency"
    assert not Event.objects.filter(kind="plan.edited").exists()


def test_an_outsider_gets_404(personas, goal, plan):
    outsider = client_for(personas.outsider)  # owns the other group
    fields = {"rows": "1", "task-0-title": "Mine now", "summary": ""}

    assert outsider.get(plan_page(plan)).status_code == 404
    assert outsider.post(plan_page(plan), fields).status_code == 404
    # Naming their own group does not reach this group's checkpoint either.
    assert outsider.get(plan_page(plan, slug="elsewhere")).status_code == 404
    assert outsider.post(plan_page(plan, slug="elsewhere"), fields).status_code == 404
    assert "Measure latency" not in html(outsider.get("/approvals/"))
    assert proposal_of(plan)["tasks"][0]["title"] == "Measure latency"


def test_a_checkpoint_that_is_not_a_plan_has_no_plan_page(personas, goal):
    other = checkpoint_raise(group=personas.group, title="Ship it?", source="human", task=goal)
    assert client_for(personas.member).get(plan_page(other)).status_code == 404


# --- deciding ----------------------------------------------------------------------------


def test_approving_after_an_edit_creates_the_edited_tasks(personas, goal, plan):
    member = client_for(personas.member)
    fields = editor_fields(html(member.get(task_page(goal))), plan)
    fields["task-1-title"] = "Chart p50 and p99"
    fields["task-2-depends_on"] = "chart"
    member.post(plan_page(plan), fields, **HTMX)

    decided = client_for(personas.approver).post(
        f"/checkpoints/{plan.id}/decide/", {"verdict": "approve", "next": "/approvals/"}
    )

    assert decided.status_code == 302
    children = {t.title: t for t in Task.objects.filter(parent=goal)}
    assert set(children) == {"Measure latency", "Chart p50 and p99", "Write the report"}
    write, chart = children["Write the report"], children["Chart p50 and p99"]
    assert list(write.dependencies.values_list("id", flat=True)) == [chart.id]
    # The decided plan is read-only now, wherever it is shown.
    page = html(member.get(task_page(goal)))
    assert "This plan is approved" in page and f'id="plan-form-{plan.id}"' not in page


@pytest.mark.parametrize("htmx", [True, False])
def test_an_edit_of_a_plan_decided_meanwhile_says_so(personas, goal, plan, htmx):
    member = client_for(personas.member)
    fields = editor_fields(html(member.get(task_page(goal))), plan)
    fields["task-0-title"] = "Too late"
    client_for(personas.approver).post(f"/checkpoints/{plan.id}/decide/", {"verdict": "reject"})

    response = member.post(plan_page(plan), fields, **(HTMX if htmx else {}))

    said = "This plan is already rejected. Your changes were not saved."
    if htmx:
        assert response.status_code == 200 and said in html(response)
        assert f'id="plan-form-{plan.id}"' not in html(response)
    else:
        assert response.status_code == 302 and response["Location"] == task_page(goal)
        assert messages_of(response) == [said]
    assert proposal_of(plan)["tasks"][0]["title"] == "Measure latency"


def test_a_plan_someone_approved_short_of_the_quorum_is_locked(personas, goal, plan):
    Checkpoint.objects.filter(id=plan.id).update(required_approvals=2)
    member = client_for(personas.member)
    fields = editor_fields(html(member.get(task_page(goal))), plan)
    client_for(personas.approver).post(f"/checkpoints/{plan.id}/decide/", {"verdict": "approve"})

    page = html(member.get(task_page(goal)))
    response = member.post(plan_page(plan), fields, **HTMX)

    assert "Someone already approved this plan" in page and "plan-form" not in page
    assert "it can no longer be edited. Your changes were not saved." in html(response)
    assert not Event.objects.filter(kind="plan.edited").exists()


def test_saving_over_someone_elses_edit_is_refused_once_with_the_typing_kept(personas, goal, plan):
    member = client_for(personas.member)
    fields = editor_fields(html(member.get(task_page(goal))), plan)
    fields["task-0-title"] = "Mine"
    theirs = plan_validate(PLAN, toolkits=known_toolkits())
    theirs["tasks"][1]["title"] = "Theirs"
    plan_edit(actor=personas.owner, checkpoint=plan, proposal=theirs)

    refused = member.post(plan_page(plan), fields, **HTMX)
    again = member.post(plan_page(plan), editor_fields(html(refused), plan), **HTMX)

    assert "Someone else edited this plan meanwhile" in html(refused)
    assert ">Theirs<" in html(refused)  # the current plan, above the form
    assert editor_fields(html(refused), plan)["task-0-title"] == "Mine"
    assert "Saved the plan" in html(again)
    assert [t["title"] for t in proposal_of(plan)["tasks"]][:2] == ["Mine", "Chart the numbers"]


# --- live --------------------------------------------------------------------------------


def live(personas, user, page: str, events, **params) -> str:
    ctx = LiveContext(
        user=user,
        group=personas.group,
        role="approver" if user == personas.approver else "member",
        params={k: str(v) for k, v in params.items()},
        events=list(events),
    )
    return "".join(PAGES[page](ctx))


def test_an_edit_redraws_the_approvals_list_and_the_task_pages_plan(personas, goal, plan):
    edited = plan_validate(PLAN, toolkits=known_toolkits())
    edited["tasks"][0]["title"] = "Measure it live"
    plan_edit(actor=personas.member, checkpoint=plan, proposal=edited)
    [event] = Event.objects.filter(kind="plan.edited")

    approvals = live(personas, personas.approver, "approvals", [event])
    task = live(personas, personas.member, "task", [event], task=goal.id)

    assert 'id="approvals" class="approvals" hx-swap-oob="true"' in approvals
    assert "Measure it live" in approvals
    # A redraw keeps an editor someone is typing in.
    assert f'id="plan-editor-{plan.id}" hx-preserve' in approvals
    assert '<section id="task-plan-review" class="card task-plan" hx-swap-oob="true">' in task
    assert "Measure it live" in task and f'id="plan-editor-{plan.id}" hx-preserve' in task
