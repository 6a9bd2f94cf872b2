"""Every endpoint x every persona, with the exact status code.

Outsiders get 404 (they may not learn that a group or its objects exist), members below
the needed role get 403, callers without credentials get 401."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings

from tests.test_api_support import PERSONAS, client_for, make_world, send, upload


def codes(owner, approver, member, viewer, outsider=404, anonymous=401) -> dict:
    return {
        "owner": owner,
        "approver": approver,
        "member": member,
        "viewer": viewer,
        "outsider": outsider,
        "anonymous": anonymous,
    }


SIGNED_IN = codes(200, 200, 200, 200, outsider=200)
READ = codes(200, 200, 200, 200)
OWNER = codes(200, 403, 403, 403)
MEMBER = codes(200, 200, 200, 403)


def _plan(client, task_id: int):
    """Planning needs a configured model; nothing answers, as the request only enqueues."""
    with override_settings(CLAW_LLM_BASE_URL="http://127.0.0.1:9/v1"):
        return send(client, "POST", f"/tasks/{task_id}/plan", None)


def _skill_document(client):
    """Making a skill needs a configured model; nothing answers, as the upload only
    enqueues."""
    with override_settings(CLAW_LLM_BASE_URL="http://127.0.0.1:9/v1"):
        return client.post(
            "/api/v1/groups/research/toolkits/shell/skills/documents",
            {"file": SimpleUploadedFile("runbook.md", b"# Deploy")},
        )


# (endpoint, request builder (world, personas, user) -> (method, path, body) or a callable
#  taking the client, expected status per persona)
ENDPOINTS = [
    ("GET /me", lambda w, p, u: ("GET", "/me", None), SIGNED_IN),
    ("GET /me/tokens", lambda w, p, u: ("GET", "/me/tokens", None), SIGNED_IN),
    (
        "POST /me/tokens",
        lambda w, p, u: ("POST", "/me/tokens", {"name": "ci"}),
        codes(201, 201, 201, 201, outsider=201),
    ),
    (
        "DELETE /me/tokens/{token_id}",
        lambda w, p, u: ("DELETE", f"/me/tokens/{w.token_for(u or p.owner).id}", None),
        codes(204, 204, 204, 204, outsider=204),
    ),
    ("GET /groups", lambda w, p, u: ("GET", "/groups", None), SIGNED_IN),
    (
        "POST /groups",
        lambda w, p, u: ("POST", "/groups", {"name": "Fresh group"}),
        codes(201, 201, 201, 201, outsider=201),
    ),
    ("GET /groups/{slug}", lambda w, p, u: ("GET", "/groups/research", None), READ),
    (
        "PATCH /groups/{slug}",
        lambda w, p, u: ("PATCH", "/groups/research", {"max_attempts": 5}),
        OWNER,
    ),
    ("GET /groups/{slug}/members", lambda w, p, u: ("GET", "/groups/research/members", None), READ),
    (
        "POST /groups/{slug}/members",
        lambda w, p, u: ("POST", "/groups/research/members", {"username": w.newbie.username}),
        codes(201, 403, 403, 403),
    ),
    (
        "PATCH /groups/{slug}/members/{user_id}",
        lambda w, p, u: (
            "PATCH",
            f"/groups/research/members/{w.extra.id}",
            {"role": "approver"},
        ),
        OWNER,
    ),
    (
        "DELETE /groups/{slug}/members/{user_id}",
        lambda w, p, u: ("DELETE", f"/groups/research/members/{w.extra.id}", None),
        codes(204, 403, 403, 403),
    ),
    ("GET /groups/{slug}/devices", lambda w, p, u: ("GET", "/groups/research/devices", None), READ),
    (
        "POST /groups/{slug}/pairing-codes",
        lambda w, p, u: ("POST", "/groups/research/pairing-codes", None),
        codes(201, 403, 403, 403),
    ),
    (
        "POST /devices/pair",
        lambda w, p, u: ("POST", "/devices/pair", {"code": w.pairing_code, "name": "phone"}),
        codes(201, 201, 201, 201, outsider=201, anonymous=201),
    ),
    (
        "POST /devices/{device_id}/revoke",
        lambda w, p, u: ("POST", f"/devices/{w.device.id}/revoke", None),
        OWNER,
    ),
    (
        "POST /devices/{device_id}/drain",
        lambda w, p, u: ("POST", f"/devices/{w.device.id}/drain", {"draining": True}),
        OWNER,
    ),
    ("GET /groups/{slug}/agents", lambda w, p, u: ("GET", "/groups/research/agents", None), READ),
    (
        "POST /agents/{agent_id}/drain",
        lambda w, p, u: ("POST", f"/agents/{p.agent.id}/drain", {"draining": True}),
        OWNER,
    ),
    (
        "GET /groups/{slug}/toolkits",
        lambda w, p, u: ("GET", "/groups/research/toolkits", None),
        READ,
    ),
    (
        "GET /groups/{slug}/toolkits/{toolkit}/skills",
        lambda w, p, u: ("GET", "/groups/research/toolkits/shell/skills", None),
        READ,
    ),
    (
        "POST /groups/{slug}/toolkits/{toolkit}/skills",
        lambda w, p, u: ("POST", "/groups/research/toolkits/shell/skills", {"text": "Be brief."}),
        codes(201, 403, 403, 403),
    ),
    (
        "POST /groups/{slug}/toolkits/{toolkit}/skills/documents",
        lambda w, p, u: _skill_document,
        codes(202, 403, 403, 403),
    ),
    ("GET /groups/{slug}/tasks", lambda w, p, u: ("GET", "/groups/research/tasks", None), READ),
    (
        "POST /groups/{slug}/tasks",
        lambda w, p, u: ("POST", "/groups/research/tasks", {"title": "Summarise"}),
        codes(201, 201, 201, 403),
    ),
    (
        "POST /groups/{slug}/tasks/graph",
        lambda w, p, u: (
            "POST",
            "/groups/research/tasks/graph",
            {
                "tasks": [
                    {"key": "a", "title": "Collect"},
                    {"key": "b", "title": "Sum", "depends_on": ["a"]},
                ]
            },
        ),
        codes(201, 201, 201, 403),
    ),
    ("GET /tasks/{task_id}", lambda w, p, u: ("GET", f"/tasks/{w.task.id}", None), READ),
    (
        "POST /tasks/{task_id}/cancel",
        lambda w, p, u: ("POST", f"/tasks/{w.task.id}/cancel", {"reason": "no longer needed"}),
        MEMBER,
    ),
    (
        "POST /tasks/{task_id}/retry",
        lambda w, p, u: ("POST", f"/tasks/{w.cancelled.id}/retry", None),
        MEMBER,
    ),
    (
        "POST /tasks/{task_id}/dependencies",
        lambda w, p, u: (
            "POST",
            f"/tasks/{w.task.id}/dependencies",
            {"depends_on": w.other_task.id},
        ),
        MEMBER,
    ),
    (
        "GET /groups/{slug}/checkpoints",
        lambda w, p, u: ("GET", "/groups/research/checkpoints", {"status": "pending"}),
        READ,
    ),
    (
        "GET /checkpoints/{checkpoint_id}",
        lambda w, p, u: ("GET", f"/checkpoints/{w.checkpoint.id}", None),
        READ,
    ),
    (
        "POST /checkpoints/{checkpoint_id}/decide",
        lambda w, p, u: ("POST", f"/checkpoints/{w.checkpoint.id}/decide", {"verdict": "approve"}),
        codes(200, 200, 403, 403),
    ),
    (
        "PUT /checkpoints/{checkpoint_id}/proposal",
        lambda w, p, u: (
            "PUT",
            f"/checkpoints/{w.plan.id}/proposal",
            {"proposal": {"summary": "One step", "tasks": [{"title": "Write it"}]}},
        ),
        MEMBER,
    ),
    (
        "POST /tasks/{task_id}/plan",
        lambda w, p, u: lambda client: _plan(client, w.task.id),
        codes(202, 202, 202, 403),
    ),
    (
        "GET /groups/{slug}/events",
        lambda w, p, u: ("GET", "/groups/research/events", {"after": 1}),
        READ,
    ),
    (
        "GET /tasks/{task_id}/artifacts",
        lambda w, p, u: ("GET", f"/tasks/{w.task.id}/artifacts", None),
        READ,
    ),
    (
        "POST /tasks/{task_id}/artifacts",
        lambda w, p, u: lambda client: upload(client, w.task.id, b"draft", name="draft.txt"),
        codes(201, 201, 201, 403),
    ),
    (
        "GET /artifacts/{artifact_id}",
        lambda w, p, u: ("GET", f"/artifacts/{w.artifact.id}", None),
        READ,
    ),
    (
        "GET /artifacts/{artifact_id}/download",
        lambda w, p, u: ("GET", f"/artifacts/{w.artifact.id}/download", None),
        READ,
    ),
    (
        "GET /openapi.json",
        lambda w, p, u: ("GET", "/openapi.json", None),
        codes(200, 200, 200, 200, outsider=200, anonymous=200),
    ),
]


@pytest.mark.parametrize("persona", PERSONAS)
@pytest.mark.parametrize(
    ("build", "expected"),
    [pytest.param(build, expected, id=name) for name, build, expected in ENDPOINTS],
)
def test_each_persona_gets_the_exact_status_on_every_endpoint(personas, persona, build, expected):
    world = make_world(personas)
    user = None if persona == "anonymous" else getattr(personas, persona)
    client = client_for(user)

    request = build(world, personas, user)
    response = request(client) if callable(request) else send(client, *request)

    assert response.status_code == expected[persona], response.content
    if response.status_code >= 400:
        assert response.json()["code"] in {"unauthenticated", "forbidden", "not_found"}


def test_the_matrix_covers_every_operation_in_the_schema(client):
    schema = client.get("/api/v1/openapi.json").json()
    operations = {
        f"{method.upper()} {path.removeprefix('/api/v1')}"
        for path, item in schema["paths"].items()
        for method in item
    }
    covered = {name for name, _, _ in ENDPOINTS} - {"GET /openapi.json"}
    assert operations == covered
