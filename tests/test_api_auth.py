"""How callers authenticate: session (+CSRF), personal API tokens, device tokens."""

from django.middleware.csrf import _get_new_csrf_string

from apps.groups.models import ApiToken, Group
from apps.groups.services import api_token_create
from apps.tasks.models import Task
from tests.test_api_support import API, assert_error, bearer, body, client_for, send


def test_a_personal_token_authenticates_and_shows_once(personas):
    created = send(client_for(personas.member), "POST", "/me/tokens", {"name": "ci"})

    assert created.status_code == 201
    raw = body(created)["token"]
    assert raw.startswith("clawp_") and body(created)["prefix"] == raw[:12]
    anonymous = client_for()
    me = send(anonymous, "GET", "/me", headers=bearer(raw))
    assert me.status_code == 200 and body(me)["username"] == "member"
    listed = body(send(client_for(personas.member), "GET", "/me/tokens"))
    assert [t["name"] for t in listed] == ["ci"] and "token" not in listed[0]
    assert ApiToken.objects.get().last_used_at is not None


def test_a_revoked_token_no_longer_authenticates(personas):
    token, raw = api_token_create(user=personas.member, name="ci")
    client = client_for()
    assert send(client, "GET", "/me", headers=bearer(raw)).status_code == 200

    revoked = send(client, "DELETE", f"/me/tokens/{token.id}", headers=bearer(raw))

    assert revoked.status_code == 204
    assert_error(send(client, "GET", "/me", headers=bearer(raw)), 401, "unauthenticated")
    again = send(client_for(personas.member), "DELETE", f"/me/tokens/{token.id}")
    assert_error(again, 404, "not_found")


def test_nobody_can_revoke_someone_elses_token(personas):
    token, raw = api_token_create(user=personas.owner, name="ci")

    response = send(client_for(personas.member), "DELETE", f"/me/tokens/{token.id}")

    assert_error(response, 404, "not_found")
    assert send(client_for(), "GET", "/me", headers=bearer(raw)).status_code == 200


def test_a_token_of_a_deactivated_user_fails(personas):
    _, raw = api_token_create(user=personas.member, name="ci")
    personas.member.is_active = False
    personas.member.save(update_fields=["is_active"])

    assert_error(send(client_for(), "GET", "/me", headers=bearer(raw)), 401, "unauthenticated")


def test_garbage_and_unknown_tokens_are_unauthenticated(personas):
    client = client_for()
    for header in ("Bearer clawp_nope", "Bearer nope", "Basic Zm9vOmJhcg==", "Bearer"):
        response = send(client, "GET", "/me", headers={"Authorization": header})
        assert_error(response, 401, "unauthenticated")


def test_a_device_token_does_not_act_as_a_person(personas):
    raw = personas.agent.device.raw_token

    response = send(client_for(), "GET", "/me", headers=bearer(raw))

    assert_error(response, 401, "unauthenticated")
    listing = send(client_for(), "GET", "/tasks/1/artifacts", headers=bearer(raw))
    assert_error(listing, 401, "unauthenticated")


def test_session_posts_need_the_csrf_token(personas):
    client = client_for(personas.member, enforce_csrf=True)

    refused = send(client, "POST", "/groups/research/tasks", {"title": "No CSRF"})

    assert_error(refused, 403, "csrf_failed")
    assert not Task.objects.exists()
    secret = _get_new_csrf_string()
    client.cookies["csrftoken"] = secret
    accepted = send(
        client, "POST", "/groups/research/tasks", {"title": "With CSRF"}, HTTP_X_CSRFTOKEN=secret
    )
    assert accepted.status_code == 201, accepted.content
    assert list(Task.objects.values_list("title", flat=True)) == ["With CSRF"]


def test_session_csrf_is_checked_on_patch_and_delete_too(personas):
    client = client_for(personas.owner, enforce_csrf=True)

    patched = send(client, "PATCH", "/groups/research", {"max_attempts": 7})
    removed = send(client, "DELETE", f"/groups/research/members/{personas.viewer.id}")

    assert_error(patched, 403, "csrf_failed")
    assert_error(removed, 403, "csrf_failed")
    assert Group.objects.get(slug="research").max_attempts == 3
    assert personas.group.memberships.filter(user=personas.viewer).exists()


def test_session_reads_need_no_csrf_token(personas):
    client = client_for(personas.viewer, enforce_csrf=True)

    assert send(client, "GET", "/groups/research/tasks").status_code == 200


def test_token_requests_need_no_csrf_token(personas):
    _, raw = api_token_create(user=personas.member, name="ci")
    client = client_for(enforce_csrf=True)

    response = send(
        client, "POST", "/groups/research/tasks", {"title": "Via token"}, headers=bearer(raw)
    )

    assert response.status_code == 201, response.content
    assert body(response)["created_by_user_id"] == personas.member.id


def test_anonymous_writes_are_unauthenticated_not_csrf_failures(db):
    client = client_for(enforce_csrf=True)

    response = send(client, "POST", "/groups", {"name": "Mine"})

    assert_error(response, 401, "unauthenticated")
    assert not Group.objects.exists()


def test_unknown_paths_under_the_api_are_json_404s(personas):
    client = client_for(personas.member)

    for path in ("/nope", "/tasks/abc", "/tasks/1/unknown"):
        assert_error(client.get(API + path), 404, "not_found")
    assert_error(send(client, "GET", "/tasks/999999"), 404, "not_found")


def test_a_wrong_method_on_a_known_path_is_a_json_405(personas):
    response = client_for(personas.member).put(f"{API}/groups/research/tasks")

    assert_error(response, 405, "method_not_allowed")
    assert set(response["Allow"].split(", ")) == {"GET", "POST"}
