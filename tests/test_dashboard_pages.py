"""Dashboard pages and actions through Django's test client, persona by persona: who sees
what, who may do what (outsiders 404, low roles 403), what each action changes, and that
the live renderers' query counts do not grow with the data."""

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from apps.checkpoints.models import Checkpoint, CheckpointStatus
from apps.checkpoints.services import checkpoint_raise
from apps.dashboard.live import PAGES, LiveContext
from apps.devices.models import Agent, AgentStatus, Device, PairingCode, Toolkit
from apps.devices.skills import skill_edit
from apps.events.models import Event
from apps.groups.models import ApiToken, Group, Membership, Role
from apps.groups.services import api_token_authenticate
from apps.tasks.services import attempt_accept, attempt_lose, task_assign, task_create
from tests.conftest import make_agent, make_user

pytestmark = pytest.mark.django_db

PERSONAS = ["owner", "approver", "member", "viewer"]


@pytest.fixture
def as_(client, personas):
    def sign_in(name: str | None):
        client.logout()
        if name is not None:
            client.force_login(getattr(personas, name))
        return client

    return sign_in


def text(response) -> str:
    return response.content.decode()


def messages_of(response) -> list[str]:
    return [str(m) for m in response.wsgi_request._messages]


def group_pages(slug: str = "research") -> list[str]:
    return [
        f"/g/{slug}/",
        f"/g/{slug}/members/",
        f"/g/{slug}/agents/",
        f"/g/{slug}/toolkits/",
        f"/g/{slug}/model/",
    ]


# --- reading pages ------------------------------------------------------------------------


def test_signed_out_visitors_are_sent_to_sign_in_first(client, personas):
    for url in ["/", "/groups/", "/approvals/", "/me/tokens/", *group_pages()]:
        response = client.get(url)
        assert response.status_code == 302 and response.url.startswith("/login/?next="), url


def test_home_redirects_signed_in_people_to_their_groups(as_):
    response = as_("member").get("/")
    assert response.status_code == 302 and response.url == reverse("dashboard:groups")


@pytest.mark.parametrize("persona", PERSONAS)
def test_members_of_every_role_see_every_group_page(as_, persona):
    client = as_(persona)
    for url in group_pages():
        response = client.get(url)
        assert response.status_code == 200, url
        page = text(response)
        assert 'id="live"' in page and "ws-connect=" in page, url
        assert 'id="approvals-badge"' in page


def test_outsiders_get_404_for_every_group_page_and_unknown_groups_too(as_):
    client = as_("outsider")
    for url in [*group_pages("research"), *group_pages("no-such-group")]:
        assert client.get(url).status_code == 404, url


def test_the_groups_page_lists_my_groups_with_my_role(as_, personas):
    page = text(as_("outsider").get("/groups/"))
    assert "Elsewhere" in page and "Research" not in page
    page = text(as_("approver").get("/groups/"))
    assert 'id="group-research"' in page and ">approver<" in page


def test_creating_a_group_makes_me_its_owner(as_):
    client = as_("viewer")
    response = client.post("/groups/", {"name": "Lab Work", "slug": ""})
    assert response.status_code == 302 and response.url == "/g/lab-work/"
    group = Group.objects.get(slug="lab-work")
    assert Membership.objects.get(group=group).role == Role.OWNER


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "", "slug": ""}, "This field is required."),
        ({"name": "Dup", "slug": "research"}, "is taken"),
        ({"name": "Bad", "slug": "no spaces"}, "Enter a valid “slug”"),
    ],
)
def test_creating_a_group_explains_what_is_wrong(as_, data, message):
    response = as_("member").post("/groups/", data)
    assert response.status_code == 400
    assert message in text(response)


def test_the_overview_counts_tasks_agents_approvals_and_shows_recent_events(as_, personas):
    task = task_create(group=personas.group, actor=personas.member, title="Count me")
    task_create(group=personas.group, actor=personas.member, title="And me")
    checkpoint_raise(group=personas.group, title="Go?", source="human", task=task)
    page = text(as_("viewer").get("/g/research/"))
    assert re.search(r'id="count-ready"[^>]*><span class="n">2</span>', page)
    assert re.search(r'id="stat-agents-online">\s*<a[^>]*><span class="stat-n">1<', page)
    assert re.search(r'id="stat-pending-approvals">\s*<a[^>]*><span class="stat-n">1<', page)
    assert '<svg viewBox="0 0 240 62"' in page and page.count('class="bar"') == 12
    last = Event.objects.filter(group=personas.group).order_by("-seq").first()
    assert f'id="event-{last.seq}"' in page
    assert f'data-seq="{personas.group.__class__.objects.get(id=personas.group.id).event_seq}"' in (
        page
    )


def test_nav_links_the_current_groups_pages_and_the_approvals_badge_counts(as_, personas):
    checkpoint_raise(group=personas.group, title="Ship it?", source="human")
    page = text(as_("approver").get("/g/research/members/"))
    for link_id, url in [
        ("nav-overview", "/g/research/"),
        ("nav-agents", "/g/research/agents/"),
        ("nav-model", "/g/research/model/"),
        ("nav-toolkits", "/g/research/toolkits/"),
        ("nav-members", "/g/research/members/"),
        ("nav-approvals", "/approvals/"),
        ("nav-tokens", "/me/tokens/"),
        ("nav-groups", "/groups/"),
    ]:
        assert f'id="{link_id}" href="{url}"' in page or (
            f'id="{link_id}" class="nav-approvals" href="{url}"' in page
        ), link_id
    assert re.search(r'id="approvals-badge"[^>]*data-count="1"', page)
    # A viewer may not decide, so nothing waits for them.
    page = text(as_("viewer").get("/g/research/"))
    assert re.search(r'id="approvals-badge"[^>]*data-count="0"', page)


# --- members, roles, leaving ---------------------------------------------------------------


def test_owners_change_roles(as_, personas):
    response = as_("owner").post(
        f"/g/research/members/{personas.member.pk}/role/", {"role": "approver"}
    )
    assert response.status_code == 302
    assert Membership.objects.get(group=personas.group, user=personas.member).role == "approver"


@pytest.mark.parametrize("persona", ["approver", "member", "viewer"])
def test_only_owners_change_roles_or_remove_people(as_, personas, persona):
    client = as_(persona)
    target = personas.viewer if persona != "viewer" else personas.member
    url = f"/g/research/members/{target.pk}/"
    assert client.post(url + "role/", {"role": "owner"}).status_code == 403
    assert client.post(url + "remove/").status_code == 403
    assert Membership.objects.get(group=personas.group, user=target).role != "owner"


def test_outsiders_cannot_touch_members(as_, personas):
    client = as_("outsider")
    url = f"/g/research/members/{personas.member.pk}/"
    assert client.post(url + "role/", {"role": "viewer"}).status_code == 404
    assert client.post(url + "remove/").status_code == 404
    assert client.post("/g/research/leave/").status_code == 404


def test_an_invalid_role_is_explained(as_, personas):
    client = as_("owner")
    response = client.post(
        f"/g/research/members/{personas.member.pk}/role/", {"role": "king"}, follow=True
    )
    assert any("Select a valid choice" in m for m in messages_of(response))
    assert Membership.objects.get(group=personas.group, user=personas.member).role == "member"


def test_owners_remove_members(as_, personas):
    response = as_("owner").post(f"/g/research/members/{personas.viewer.pk}/remove/")
    assert response.status_code == 302
    assert not Membership.objects.filter(group=personas.group, user=personas.viewer).exists()


@pytest.mark.parametrize("persona", ["approver", "member", "viewer"])
def test_anyone_may_leave(as_, personas, persona):
    response = as_(persona).post("/g/research/leave/")
    assert response.status_code == 302 and response.url == "/groups/"
    user = getattr(personas, persona)
    assert not Membership.objects.filter(group=personas.group, user=user).exists()


def test_the_last_owner_cannot_leave_or_step_down(as_, personas):
    client = as_("owner")
    response = client.post("/g/research/leave/", follow=True)
    assert "A group keeps at least one owner." in messages_of(response)
    response = client.post(
        f"/g/research/members/{personas.owner.pk}/role/", {"role": "member"}, follow=True
    )
    assert "A group keeps at least one owner." in messages_of(response)
    assert Membership.objects.get(group=personas.group, user=personas.owner).role == "owner"
    # With a second owner, the first may go.
    Membership.objects.filter(group=personas.group, user=personas.approver).update(role="owner")
    assert client.post("/g/research/leave/").status_code == 302
    assert not Membership.objects.filter(group=personas.group, user=personas.owner).exists()


def test_the_members_page_shows_owner_controls_to_owners_only(as_, personas):
    owner_page = text(as_("owner").get("/g/research/members/"))
    assert f'id="role-{personas.member.pk}"' in owner_page
    assert 'id="invite-create-form"' in owner_page
    member_page = text(as_("member").get("/g/research/members/"))
    assert f'id="role-{personas.member.pk}"' not in member_page
    assert 'id="invite-create-form"' not in member_page
    assert 'id="leave-group"' in member_page


# --- API tokens --------------------------------------------------------------------------


def test_a_token_is_shown_once_and_works_until_revoked(as_, personas):
    client = as_("member")
    response = client.post("/me/tokens/", {"name": "laptop scripts"})
    assert response.status_code == 200
    raw = re.search(r'value="(clawp_[^"]+)"', text(response)).group(1)
    assert api_token_authenticate(raw=raw) == personas.member
    page = text(client.get("/me/tokens/"))
    assert raw not in page and "laptop scripts" in page
    token = ApiToken.objects.get(user=personas.member)
    assert client.post(f"/me/tokens/{token.id}/revoke/").status_code == 302
    assert api_token_authenticate(raw=raw) is None


def test_a_token_needs_a_name_and_others_tokens_cannot_be_revoked(as_, personas):
    client = as_("member")
    response = client.post("/me/tokens/", {"name": "   "})
    assert response.status_code == 400 and "This field is required." in text(response)
    client.post("/me/tokens/", {"name": "mine"})
    token = ApiToken.objects.get(user=personas.member)
    assert as_("viewer").post(f"/me/tokens/{token.id}/revoke/").status_code == 404
    assert ApiToken.objects.get(id=token.id).revoked_at is None


# --- agents and devices -------------------------------------------------------------------


def test_the_agents_page_shows_status_toolkits_work_and_success_rate(as_, personas):
    task = task_create(group=personas.group, actor=personas.member, title="Crunch")
    task_assign(task_id=task.id, agent_id=personas.agent.id)
    Agent.objects.filter(id=personas.agent.id).update(succeeded_count=3, failed_count=1)
    suspect = make_agent(personas.group, "beta")
    Agent.objects.filter(id=suspect.id).update(status=AgentStatus.SUSPECT)
    page = text(as_("viewer").get("/g/research/agents/"))
    agent = personas.agent
    assert f'id="agent-{agent.id}-status">busy<' in page  # its one slot is taken
    assert f'id="agent-{suspect.id}-status">suspect<' in page
    assert '<span class="chip">python</span><span class="chip">shell</span>' in page
    assert f"#{task.id} Crunch" in page and "75%" in page
    assert "stranger" not in page  # the other group's agent


def test_owners_pair_a_device_with_a_code_a_command_and_a_qr_code(as_, personas):
    response = as_("owner").post("/g/research/pairing-codes/")
    assert response.status_code == 200
    page = text(response)
    code = re.search(r'id="pairing-code">([A-Z0-9]{4}-[A-Z0-9]{4})<', page).group(1)
    assert f"claw device pair --server http://testserver --code {code}" in page
    assert '<svg width="' in page and 'class="segno"' in page
    assert PairingCode.objects.filter(group=personas.group).count() == 1


@pytest.mark.parametrize("persona", ["approver", "member", "viewer"])
def test_only_owners_pair_revoke_and_drain(as_, personas, persona):
    client = as_(persona)
    device = personas.agent.device
    assert client.post("/g/research/pairing-codes/").status_code == 403
    assert client.post(f"/g/research/devices/{device.id}/revoke/").status_code == 403
    assert (
        client.post(f"/g/research/devices/{device.id}/drain/", {"draining": "1"}).status_code == 403
    )
    assert (
        client.post(f"/g/research/agents/{personas.agent.id}/drain/", {"draining": "1"}).status_code
        == 403
    )
    device.refresh_from_db()
    assert (device.revoked_at, device.draining) == (None, False)
    assert not PairingCode.objects.exists()


def test_outsiders_cannot_pair_revoke_or_drain(as_, personas):
    client = as_("outsider")
    device = personas.agent.device
    assert client.post("/g/research/pairing-codes/").status_code == 404
    assert client.post(f"/g/research/devices/{device.id}/revoke/").status_code == 404
    assert (
        client.post(f"/g/research/agents/{personas.agent.id}/drain/", {"draining": "1"}).status_code
        == 404
    )
    # Nor through their own group's URL.
    assert client.post(f"/g/elsewhere/devices/{device.id}/revoke/").status_code == 404


def test_owners_revoke_devices_and_drain_agents_and_devices(as_, personas):
    client = as_("owner")
    agent, device = personas.agent, personas.agent.device
    assert (
        client.post(f"/g/research/agents/{agent.id}/drain/", {"draining": "1"}).status_code == 302
    )
    assert Agent.objects.get(id=agent.id).status == AgentStatus.DRAINING
    assert (
        client.post(f"/g/research/agents/{agent.id}/drain/", {"draining": "0"}).status_code == 302
    )
    assert Agent.objects.get(id=agent.id).status == AgentStatus.ONLINE
    assert (
        client.post(f"/g/research/devices/{device.id}/drain/", {"draining": "1"}).status_code == 302
    )
    assert Device.objects.get(id=device.id).draining
    assert client.post(f"/g/research/devices/{device.id}/revoke/").status_code == 302
    assert Device.objects.get(id=device.id).revoked_at is not None
    assert Agent.objects.get(id=agent.id).status == AgentStatus.OFFLINE
    response = client.post(f"/g/research/devices/{device.id}/revoke/", follow=True)
    assert "This device is already revoked." in messages_of(response)
    response = client.post(
        f"/g/research/devices/{device.id}/drain/", {"draining": "x"}, follow=True
    )
    assert any("Select a valid choice" in m for m in messages_of(response))


# --- approvals ----------------------------------------------------------------------------


@pytest.fixture
def exhausted(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Flaky", max_attempts=1)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)
    attempt_lose(attempt_id=attempt.id, reason="lease expired")
    return Checkpoint.objects.get(task=task, kind="max_attempts")


def test_the_inbox_lists_what_i_may_decide_across_groups(as_, personas):
    mine = checkpoint_raise(group=personas.group, title="Ship it?", source="human")
    owners_only = checkpoint_raise(
        group=personas.group, title="Spend money?", source="human", decider_role="owner"
    )
    Membership.objects.create(group=personas.other_group, user=personas.approver, role="approver")
    elsewhere = checkpoint_raise(group=personas.other_group, title="Other?", source="human")
    page = text(as_("approver").get("/approvals/"))
    assert f'id="checkpoint-{mine.id}"' in page and f'id="checkpoint-{elsewhere.id}"' in page
    assert f'id="checkpoint-{owners_only.id}"' not in page
    assert f'id="approve-{mine.id}"' in page and f'id="reject-{mine.id}"' in page
    assert f'id="changes-{mine.id}"' in page and f'id="note-{mine.id}"' in page
    assert re.search(r'id="approvals-badge"[^>]*data-count="2"', page)
    owner_page = text(as_("owner").get("/approvals/"))
    assert f'id="checkpoint-{owners_only.id}"' in owner_page
    assert f'id="checkpoint-{elsewhere.id}"' not in owner_page
    for persona in ("viewer", "member"):
        assert 'id="approvals-empty"' in text(as_(persona).get("/approvals/")), persona
    outsider_page = text(as_("outsider").get("/approvals/"))  # owns "elsewhere"
    assert f'id="checkpoint-{elsewhere.id}"' in outsider_page
    assert f'id="checkpoint-{mine.id}"' not in outsider_page


def test_an_approver_approves_in_one_post_and_is_sent_back_to_the_inbox(as_, personas):
    checkpoint = checkpoint_raise(group=personas.group, title="Ship it?", source="human")
    response = as_("approver").post(
        f"/checkpoints/{checkpoint.id}/decide/", {"verdict": "approve", "next": "/approvals/"}
    )
    assert response.status_code == 302 and response.url == "/approvals/"
    assert Checkpoint.objects.get(id=checkpoint.id).status == CheckpointStatus.APPROVED


@pytest.mark.parametrize(
    ("verdict", "status"),
    [
        ("reject", CheckpointStatus.REJECTED),
        ("request_changes", CheckpointStatus.CHANGES_REQUESTED),
    ],
)
def test_rejecting_or_asking_for_changes_with_a_note_ignores_the_option_shown(
    as_, personas, verdict, status
):
    checkpoint = checkpoint_raise(
        group=personas.group, title="Which?", source="human", options=["a", "b"]
    )
    response = as_("approver").post(
        f"/checkpoints/{checkpoint.id}/decide/",
        {"verdict": verdict, "note": "not yet", "option": "a"},
    )
    assert response.status_code == 302
    checkpoint.refresh_from_db()
    assert checkpoint.status == status
    assert checkpoint.decisions.get().note == "not yet"


@pytest.mark.parametrize("persona", ["viewer", "member"])
def test_viewers_and_members_cannot_decide(as_, personas, persona):
    checkpoint = checkpoint_raise(group=personas.group, title="Ship it?", source="human")
    response = as_(persona).post(f"/checkpoints/{checkpoint.id}/decide/", {"verdict": "approve"})
    assert response.status_code == 403
    assert Checkpoint.objects.get(id=checkpoint.id).status == CheckpointStatus.PENDING


def test_outsiders_cannot_decide_or_learn_the_checkpoint_exists(as_, personas):
    checkpoint = checkpoint_raise(group=personas.group, title="Ship it?", source="human")
    client = as_("outsider")
    assert (
        client.post(f"/checkpoints/{checkpoint.id}/decide/", {"verdict": "approve"}).status_code
        == 404
    )
    assert client.post("/checkpoints/999999/decide/", {"verdict": "approve"}).status_code == 404
    assert as_(None).post(f"/checkpoints/{checkpoint.id}/decide/").status_code == 302


def test_deciding_explains_bad_input_and_refuses_a_second_decision(as_, personas):
    checkpoint = checkpoint_raise(
        group=personas.group, title="Ship it?", source="human", required_approvals=2
    )
    client = as_("approver")
    url = f"/checkpoints/{checkpoint.id}/decide/"
    response = client.post(url, {"verdict": "maybe"}, follow=True)
    assert any("Select a valid choice" in m for m in messages_of(response))
    client.post(url, {"verdict": "approve"})
    response = client.post(url, {"verdict": "approve"}, follow=True)
    assert any("You already decided" in m for m in messages_of(response))
    assert client.get("/checkpoints/1/decide/").status_code == 405


def test_a_task_out_of_attempts_offers_retry_reassign_cancel_and_an_agent_picker(
    as_, personas, exhausted
):
    chosen = make_agent(personas.group, "chosen")
    page = text(as_("approver").get("/approvals/"))
    assert f'id="option-{exhausted.id}"' in page and f'id="assign-{exhausted.id}"' in page
    assert f'<option value="{chosen.id}">chosen (online)</option>' in page
    assert "stranger" not in page
    client = as_("approver")
    url = f"/checkpoints/{exhausted.id}/decide/"
    response = client.post(url, {"verdict": "approve", "option": "reassign"}, follow=True)
    assert any("reassign needs assign_to" in m for m in messages_of(response))
    response = client.post(
        url, {"verdict": "approve", "option": "reassign", "assign_to": str(chosen.id)}
    )
    assert response.status_code == 302
    attempt = exhausted.task.attempts.get(epoch=2)
    assert (attempt.agent_id, attempt.status) == (chosen.id, "offered")


# --- live renderers -----------------------------------------------------------------------


def _render(page: str, personas, *, user=None, events=None, resync=False) -> tuple[list, int]:
    group = Group.objects.get(id=personas.group.id)
    user = user or personas.owner
    context = LiveContext(
        user=user, group=group, role="owner", params={}, events=events or [], resync=resync
    )
    with CaptureQueriesContext(connection) as queries:
        fragments = PAGES[page](context)
    return fragments, len(queries)


def _grow(personas, n: int) -> None:
    shell = Toolkit.objects.get(slug="shell")
    for i in range(n):
        task = task_create(group=personas.group, actor=personas.member, title=f"T{i}")
        skill_edit(actor=personas.owner, group=personas.group, toolkit=shell, text=f"S{i}")
        if i % 3 == 0:
            checkpoint_raise(group=personas.group, title=f"C{i}", source="human", task=task)
    for i in range(2):
        make_agent(personas.group, f"extra-{n}-{i}")


@pytest.mark.parametrize(
    "page", ["overview", "agents", "approvals", "members", "groups", "toolkits"]
)
def test_renderer_query_counts_do_not_grow_with_events_or_tasks(personas, page):
    _grow(personas, 2)
    events = list(Event.objects.filter(group=personas.group).order_by("seq"))
    resync = page in ("members", "groups", "toolkits")  # task events do not concern them
    _, few = _render(page, personas, events=events, resync=resync)
    _grow(personas, 12)
    events = list(Event.objects.filter(group=personas.group).order_by("seq"))
    fragments, many = _render(page, personas, events=events, resync=resync)
    assert fragments and all('hx-swap-oob="true"' in f for f in fragments)
    assert many == few, (page, few, many)


def test_renderers_skip_events_that_do_not_concern_them(personas):
    task = task_create(group=personas.group, actor=personas.member, title="T")
    events = list(Event.objects.filter(task=task))
    assert _render("members", personas, events=events)[0] == []
    assert _render("groups", personas, events=events)[0] == []
    assert _render("approvals", personas, events=events)[0] == []
    assert _render("overview", personas)[0] == []
    fragments, _ = _render("overview", personas, resync=True)
    assert [re.search(r'id="([^"]+)"', f).group(1) for f in fragments] == [
        "overview-stats",
        "throughput",
        "recent-events",
    ]


def test_the_pages_ignore_other_users_that_share_no_group(personas):
    stranger = make_user("stranger")
    fragments, _ = _render("approvals", personas, user=stranger, resync=True)
    assert 'id="approvals-empty"' in fragments[0]


def test_every_page_opens_the_page_socket_for_its_live_page(as_):
    client = as_("approver")
    for url, query in [
        ("/g/research/", "page=overview&amp;group=research"),
        ("/g/research/agents/", "page=agents&amp;group=research"),
        ("/g/research/members/", "page=members&amp;group=research"),
        ("/g/research/toolkits/", "page=toolkits&amp;group=research"),
        ("/g/research/model/", "page=model&amp;group=research"),
        ("/approvals/", "page=approvals&amp;group=research"),
        ("/groups/", "page=groups&amp;group=research"),
        ("/me/tokens/", "page=nav&amp;group=research"),
    ]:
        page = text(client.get(url))
        assert f'ws-connect="/ws/live/?{query}"' in page, url
        assert re.search(r'id="live"[^>]*data-seq="\d+"', page), url
