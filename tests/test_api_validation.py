"""Bad input gets a JSON error with a stable code naming the field, and nothing is written."""

import pytest
from django.test import override_settings

from apps.checkpoints.models import Decision
from apps.checkpoints.services import checkpoint_raise
from apps.devices.models import Device
from apps.events.models import Event
from apps.groups.models import ApiToken, Group, Membership
from apps.tasks.models import Artifact, Task, TaskDependency
from apps.tasks.services import task_create
from tests.test_api_support import API, assert_error, client_for, send, upload

MODELS = (Group, Membership, ApiToken, Device, Task, TaskDependency, Artifact, Decision, Event)


def counts() -> dict:
    return {model.__name__: model.objects.count() for model in MODELS}


@pytest.fixture
def unchanged(personas):
    """Asserts, after the test, that no row of any model was written."""
    before = counts()
    yield
    assert counts() == before


def fields_in(error: dict) -> set[str]:
    return {e["field"] for e in error["details"]["errors"]}


def test_malformed_json_is_rejected(personas, unchanged):
    response = client_for(personas.member).post(
        f"{API}/groups/research/tasks", b'{"title": "oops",', content_type="application/json"
    )

    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "ok", "priority": 101}, "priority"),
        ({"title": "ok", "max_attempts": 0}, "max_attempts"),
        ({"title": "ok", "instructions": "x" * 100_001}, "instructions"),
        ({"title": "ok", "required_toolkits": ["Not A Slug"]}, "required_toolkits.0"),
        ({"title": "ok", "steps": [{"tool": "shell", "oops": 1}]}, "steps.0.oops"),
        ({"title": "ok", "steps": [{"args": {}}]}, "steps.0.tool"),
        ({"title": "ok", "depends_on": ["first"]}, "depends_on.0"),
        ({"title": "ok", "colour": "red"}, "colour"),
        (["a", "list"], "body"),
    ],
    ids=[
        "missing-title",
        "oversized-title",
        "priority-out-of-range",
        "zero-attempts",
        "oversized-instructions",
        "bad-toolkit-slug",
        "unknown-step-field",
        "step-without-tool",
        "non-integer-dependency",
        "unknown-field",
        "not-an-object",
    ],
)
def test_bad_task_input_names_the_field(personas, unchanged, payload, field):
    response = send(client_for(personas.member), "POST", "/groups/research/tasks", payload)

    error = assert_error(response, 422, "validation_error")
    assert field in fields_in(error)
    assert error["message"].startswith(f"{field}: ")


def test_an_unknown_toolkit_is_rejected_by_name(personas, unchanged):
    response = send(
        client_for(personas.member),
        "POST",
        "/groups/research/tasks",
        {"title": "Needs magic", "required_toolkits": ["shell", "telepathy"]},
    )

    error = assert_error(response, 422, "unknown_toolkit")
    assert error["details"] == {"unknown": ["telepathy"]}


def test_a_dependency_outside_the_group_is_rejected(personas, unchanged):
    response = send(
        client_for(personas.member),
        "POST",
        "/groups/research/tasks",
        {"title": "Later", "depends_on": [987654]},
    )

    assert_error(response, 422, "unknown_dependency")


def test_a_dependency_cycle_is_refused(personas):
    first = task_create(group=personas.group, actor=personas.member, title="First")
    second = task_create(
        group=personas.group, actor=personas.member, title="Second", depends_on=[first.id]
    )
    before = counts()

    response = send(
        client_for(personas.member),
        "POST",
        f"/tasks/{first.id}/dependencies",
        {"depends_on": second.id},
    )

    assert_error(response, 422, "dependency_cycle")
    assert counts() == before
    self_loop = send(
        client_for(personas.member),
        "POST",
        f"/tasks/{first.id}/dependencies",
        {"depends_on": first.id},
    )
    assert_error(self_loop, 422, "dependency_cycle")
    assert counts() == before


@pytest.mark.parametrize(
    ("method", "path", "payload", "field"),
    [
        ("POST", "/groups/research/members", {"username": "viewer", "role": "admin"}, "role"),
        ("PATCH", "/groups/research/members/{viewer}", {"role": "king"}, "role"),
        (
            "PATCH",
            "/groups/research",
            {"default_checkpoint_policy": "always"},
            "default_checkpoint_policy",
        ),
        ("PATCH", "/groups/research", {"heartbeat_interval_s": 0}, "heartbeat_interval_s"),
        ("PATCH", "/groups/research", {"max_attempts": None}, "max_attempts"),
        ("PATCH", "/groups/research", {}, "body"),
        ("POST", "/groups", {"name": "x" * 101}, "name"),
        ("POST", "/groups", {"name": "Ok", "slug": "no spaces"}, "slug"),
        ("POST", "/me/tokens", {"name": ""}, "name"),
        ("POST", "/devices/pair", {"code": "AAAA-BBBB", "name": "pc", "kind": "toaster"}, "kind"),
        ("POST", "/devices/pair", {"code": "AAAA-BBBB", "name": "p" * 101}, "name"),
        ("POST", "/devices/{device}/drain", {"draining": "maybe"}, "draining"),
        ("POST", "/tasks/{task}/cancel", {"reason": "r" * 1001}, "reason"),
        ("POST", "/checkpoints/{checkpoint}/decide", {"verdict": "shrug"}, "verdict"),
        (
            "POST",
            "/checkpoints/{checkpoint}/decide",
            {"verdict": "approve", "note": "n" * 5001},
            "note",
        ),
        ("GET", "/groups/research/tasks", {"limit": 201}, "limit"),
        ("GET", "/groups/research/tasks", {"status": "sleeping"}, "status"),
        ("GET", "/groups/research/tasks", {"offset": -1}, "offset"),
        ("GET", "/groups/research/events", {"limit": 501}, "limit"),
        ("GET", "/groups/research/events", {"after": "yesterday"}, "after"),
        ("GET", "/groups/research/checkpoints", {"status": "maybe"}, "status"),
    ],
)
def test_bad_input_elsewhere_names_the_field(personas, method, path, payload, field):
    task = task_create(group=personas.group, actor=personas.owner, title="Target")
    checkpoint = checkpoint_raise(group=personas.group, title="Go?", source="human")
    path = path.format(
        viewer=personas.viewer.id,
        device=personas.agent.device.id,
        task=task.id,
        checkpoint=checkpoint.id,
    )
    before = counts()

    response = send(client_for(personas.owner), method, path, payload)

    error = assert_error(response, 422, "validation_error")
    assert field in fields_in(error), error
    assert counts() == before


def test_policies_that_break_the_lease_rule_are_refused(personas, unchanged):
    response = send(client_for(personas.owner), "PATCH", "/groups/research", {"lease_timeout_s": 5})

    assert_error(response, 422, "invalid")
    assert Group.objects.get(slug="research").lease_timeout_s == 30


def test_an_oversized_json_body_is_too_large(personas, unchanged):
    steps = [{"tool": "shell", "args": {"cmd": "x" * 20_000}}] * 120

    response = send(
        client_for(personas.member),
        "POST",
        "/groups/research/tasks",
        {"title": "Big", "steps": steps},
    )

    assert_error(response, 413, "too_large")


@override_settings(CLAW_ARTIFACT_MAX_BYTES=1024)
def test_an_oversized_upload_is_too_large(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Report")
    before = counts()

    response = upload(client_for(personas.member), task.id, b"x" * 1025, name="big.bin")

    assert_error(response, 413, "too_large")
    assert counts() == before


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "n" * 201}, "name"),
        ({"kind": "hologram"}, "kind"),
        ({"attempt_id": "first"}, "attempt_id"),
    ],
)
def test_bad_upload_fields_name_the_field(personas, fields, field):
    task = task_create(group=personas.group, actor=personas.member, title="Report")
    before = counts()

    response = upload(client_for(personas.member), task.id, **fields)

    error = assert_error(response, 422, "validation_error")
    assert field in fields_in(error)
    assert counts() == before


def test_an_upload_without_a_file_names_the_file_field(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Report")

    response = client_for(personas.member).post(f"{API}/tasks/{task.id}/artifacts", {"name": "x"})

    assert "file" in fields_in(assert_error(response, 422, "validation_error"))
    assert not Artifact.objects.exists()
