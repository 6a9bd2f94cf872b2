"""Groups, their policies and their members; /me; the OpenAPI schema."""

from apps.events.models import Event
from apps.groups.models import Group, Membership, Role
from tests.conftest import make_user
from tests.test_api_support import API, assert_error, body, client_for, send


def test_me_says_who_is_signed_in(personas):
    response = send(client_for(personas.approver), "GET", "/me")

    assert body(response) == {"id": personas.approver.id, "username": "approver", "email": ""}


def test_a_new_group_makes_its_creator_the_owner(personas):
    client = client_for(personas.outsider)

    response = send(
        client,
        "POST",
        "/groups",
        {
            "name": "Lab Notes",
            "heartbeat_interval_s": 5,
            "default_checkpoint_policy": "before_start",
        },
    )

    assert response.status_code == 201, response.content
    data = body(response)
    assert data["slug"] == "lab-notes" and data["role"] == "owner"
    assert data["heartbeat_interval_s"] == 5 and data["lease_timeout_s"] == 30
    assert data["default_checkpoint_policy"] == "before_start"
    assert Membership.objects.get(group_id=data["id"]).user == personas.outsider
    mine = body(send(client, "GET", "/groups"))
    assert [(g["slug"], g["role"]) for g in mine] == [
        ("elsewhere", "owner"),
        ("lab-notes", "owner"),
    ]


def test_a_taken_slug_is_refused(personas):
    response = send(
        client_for(personas.member), "POST", "/groups", {"name": "R", "slug": "research"}
    )

    assert_error(response, 422, "slug_taken")
    assert Group.objects.count() == 2


def test_my_groups_show_my_role_in_each(personas):
    groups = body(send(client_for(personas.viewer), "GET", "/groups"))

    assert [(g["slug"], g["role"]) for g in groups] == [("research", "viewer")]


def test_an_owner_changes_policies(personas):
    response = send(
        client_for(personas.owner),
        "PATCH",
        "/groups/research",
        {"heartbeat_interval_s": 20, "lease_timeout_s": 90, "max_attempts": 4},
    )

    assert response.status_code == 200, response.content
    data = body(response)
    assert (data["heartbeat_interval_s"], data["lease_timeout_s"], data["max_attempts"]) == (
        20,
        90,
        4,
    )
    assert data["reconnect_grace_s"] == 10
    event = Event.objects.get(kind="group.updated")
    assert event.payload == {"heartbeat_interval_s": 20, "lease_timeout_s": 90, "max_attempts": 4}


def test_an_owner_adds_promotes_and_removes_a_member(personas):
    client = client_for(personas.owner)
    newbie = make_user("newbie")

    added = send(client, "POST", "/groups/research/members", {"username": "newbie"})
    promoted = send(client, "PATCH", f"/groups/research/members/{newbie.id}", {"role": "approver"})
    removed = send(client, "DELETE", f"/groups/research/members/{newbie.id}")

    assert added.status_code == 201 and body(added)["role"] == "member"
    assert body(added)["username"] == "newbie" and body(added)["joined_at"]
    assert body(promoted)["role"] == "approver"
    assert removed.status_code == 204
    assert not Membership.objects.filter(group=personas.group, user=newbie).exists()
    kinds = list(Event.objects.values_list("kind", flat=True))
    assert kinds == ["member.added", "member.role_changed", "member.removed"]


def test_members_are_listed_by_username(personas):
    members = body(send(client_for(personas.viewer), "GET", "/groups/research/members"))

    assert [(m["username"], m["role"]) for m in members] == [
        ("approver", "approver"),
        ("member", "member"),
        ("owner", "owner"),
        ("viewer", "viewer"),
    ]


def test_adding_an_unknown_user_or_an_existing_member_is_refused(personas):
    client = client_for(personas.owner)

    unknown = send(client, "POST", "/groups/research/members", {"username": "nobody"})
    existing = send(client, "POST", "/groups/research/members", {"username": "viewer"})

    assert_error(unknown, 422, "unknown_user")
    assert_error(existing, 409, "already_member")
    assert personas.group.memberships.count() == 4


def test_a_member_can_leave_but_the_last_owner_cannot(personas):
    left = send(
        client_for(personas.viewer), "DELETE", f"/groups/research/members/{personas.viewer.id}"
    )
    stuck = send(
        client_for(personas.owner), "DELETE", f"/groups/research/members/{personas.owner.id}"
    )
    demoted = send(
        client_for(personas.owner),
        "PATCH",
        f"/groups/research/members/{personas.owner.id}",
        {"role": "member"},
    )

    assert left.status_code == 204
    assert_error(stuck, 409, "last_owner")
    assert_error(demoted, 409, "last_owner")
    assert Membership.objects.get(group=personas.group, user=personas.owner).role == Role.OWNER


def test_a_non_member_cannot_be_given_a_role(personas):
    response = send(
        client_for(personas.owner),
        "PATCH",
        f"/groups/research/members/{personas.outsider.id}",
        {"role": "viewer"},
    )

    assert_error(response, 404, "not_found")
    assert not Membership.objects.filter(group=personas.group, user=personas.outsider).exists()


def test_an_unknown_group_looks_the_same_as_someone_elses(personas):
    client = client_for(personas.member)

    missing = send(client, "GET", "/groups/no-such-group")
    hidden = send(client, "GET", "/groups/elsewhere")

    assert_error(missing, 404, "not_found")
    assert body(hidden) == body(missing)


def test_the_openapi_schema_loads_and_lists_every_path(db):
    response = client_for().get(f"{API}/openapi.json")

    assert response.status_code == 200
    schema = body(response)
    assert schema["info"]["title"] == "Claw API"
    paths = {path.removeprefix("/api/v1") for path in schema["paths"]}
    assert paths == {
        "/me",
        "/me/tokens",
        "/me/tokens/{token_id}",
        "/groups",
        "/groups/{slug}",
        "/groups/{slug}/members",
        "/groups/{slug}/members/{user_id}",
        "/groups/{slug}/devices",
        "/groups/{slug}/pairing-codes",
        "/devices/pair",
        "/devices/{device_id}/revoke",
        "/devices/{device_id}/drain",
        "/groups/{slug}/agents",
        "/agents/{agent_id}/drain",
        "/groups/{slug}/toolkits",
        "/groups/{slug}/toolkits/{toolkit}/skills",
        "/groups/{slug}/toolkits/{toolkit}/skills/documents",
        "/groups/{slug}/tasks",
        "/groups/{slug}/tasks/graph",
        "/tasks/{task_id}",
        "/tasks/{task_id}/cancel",
        "/tasks/{task_id}/retry",
        "/tasks/{task_id}/dependencies",
        "/tasks/{task_id}/plan",
        "/groups/{slug}/checkpoints",
        "/checkpoints/{checkpoint_id}",
        "/checkpoints/{checkpoint_id}/decide",
        "/checkpoints/{checkpoint_id}/proposal",
        "/groups/{slug}/events",
        "/tasks/{task_id}/artifacts",
        "/artifacts/{artifact_id}",
        "/artifacts/{artifact_id}/download",
    }
    assert "security" not in schema["paths"]["/api/v1/devices/pair"]["post"]
    assert set(schema["components"]["securitySchemes"]) >= {"PersonalTokenAuth", "CsrfSessionAuth"}
