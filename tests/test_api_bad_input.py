"""Input a fuzzer sends: numbers beyond 64 bits, multipart bodies without a boundary, NUL
bytes in names. Each answers 4xx with a stable code, never a 500, and writes nothing."""

import pytest

from apps.tasks.models import Artifact, Task, TaskDependency
from apps.tasks.services import task_create
from tests.test_api_support import API, assert_error, client_for, send, upload

HUGE = 2**64  # beyond PostgreSQL's bigint and SQLite's integer
ID_PATHS = [
    ("get", "/tasks/{n}"),
    ("post", "/tasks/{n}/cancel"),
    ("post", "/tasks/{n}/retry"),
    ("post", "/tasks/{n}/plan"),
    ("post", "/tasks/{n}/dependencies"),
    ("get", "/tasks/{n}/artifacts"),
    ("get", "/artifacts/{n}"),
    ("get", "/artifacts/{n}/download"),
    ("get", "/checkpoints/{n}"),
    ("post", "/checkpoints/{n}/decide"),
    ("put", "/checkpoints/{n}/proposal"),
    ("post", "/devices/{n}/revoke"),
    ("post", "/devices/{n}/drain"),
    ("post", "/agents/{n}/drain"),
    ("delete", "/me/tokens/{n}"),
    ("patch", "/groups/research/members/{n}"),
    ("delete", "/groups/research/members/{n}"),
]


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path


@pytest.fixture
def task(personas):
    return task_create(group=personas.group, actor=personas.owner, title="Write the report")


@pytest.mark.parametrize(("method", "path"), ID_PATHS, ids=[f"{m} {p}" for m, p in ID_PATHS])
def test_an_id_beyond_64_bits_in_the_path_is_a_validation_error(personas, method, path):
    response = send(client_for(personas.owner), method, path.format(n=HUGE))

    assert_error(response, 422, "validation_error")


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/groups/research/tasks", {"offset": HUGE}, "offset"),
        ("/groups/research/tasks", {"agent": HUGE}, "agent"),
        ("/groups/research/tasks", {"parent": HUGE}, "parent"),
        ("/groups/research/checkpoints", {"offset": HUGE}, "offset"),
        ("/groups/research/events", {"after": HUGE}, "after"),
    ],
)
def test_a_query_number_beyond_64_bits_is_a_validation_error(personas, path, query, field):
    response = send(client_for(personas.owner), "get", path, query)

    error = assert_error(response, 422, "validation_error")
    assert {e["field"] for e in error["details"]["errors"]} == {field}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "t", "depends_on": [HUGE]}, "depends_on.0"),
        ({"title": "t", "parent_id": HUGE}, "parent_id"),
    ],
)
def test_a_body_number_beyond_64_bits_is_a_validation_error(personas, body, field):
    response = send(client_for(personas.owner), "post", "/groups/research/tasks", body)

    error = assert_error(response, 422, "validation_error")
    assert {e["field"] for e in error["details"]["errors"]} == {field}
    assert not Task.objects.exists()


def test_a_dependency_beyond_64_bits_is_a_validation_error(personas, task):
    response = send(
        client_for(personas.owner), "post", f"/tasks/{task.id}/dependencies", {"depends_on": HUGE}
    )

    assert_error(response, 422, "validation_error")
    assert not TaskDependency.objects.exists()


def test_upload_form_numbers_beyond_64_bits_are_validation_errors(personas, task):
    response = upload(client_for(personas.owner), task.id, attempt_id=HUGE, epoch=HUGE)

    assert_error(response, 422, "validation_error")


def test_a_decision_reassigning_to_an_agent_beyond_64_bits_is_a_validation_error(personas):
    response = send(
        client_for(personas.owner),
        "post",
        "/checkpoints/1/decide",
        {"verdict": "approve", "option": "reassign", "assign_to": HUGE},
    )

    error = assert_error(response, 422, "validation_error")
    assert {e["field"] for e in error["details"]["errors"]} == {"assign_to"}


def test_multipart_without_a_boundary_is_a_bad_request(personas, task):
    response = client_for(personas.owner).generic(
        "POST",
        f"{API}/tasks/{task.id}/artifacts",
        b"--x\r\nContent-Disposition: form-data; name=file\r\n\r\nhi\r\n--x--\r\n",
        content_type="multipart/form-data",
    )

    assert_error(response, 400, "bad_multipart")
    assert not Artifact.objects.exists()


def test_a_skill_document_without_a_boundary_is_a_bad_request(personas):
    response = client_for(personas.owner).generic(
        "POST",
        f"{API}/groups/research/toolkits/shell/skills/documents",
        b"garbage",
        content_type="multipart/form-data; boundary=",
    )

    assert_error(response, 400, "bad_multipart")


def test_an_artifact_name_with_a_nul_byte_is_refused(personas, task, media_root):
    response = upload(client_for(personas.owner), task.id, name="report\x00.txt")

    assert_error(response, 422, "invalid")
    assert not Artifact.objects.exists()


# --- the same numbers through the pages ---------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/g/research/tasks/{HUGE}/",
        f"/g/research/tasks/1/artifacts/{HUGE}/",
        f"/g/research/checkpoints/{HUGE}/plan/",
    ],
)
def test_a_page_for_an_id_beyond_64_bits_is_not_found(personas, path):
    assert client_for(personas.owner).get(path).status_code == 404


@pytest.mark.parametrize(
    "query",
    [{"agent": HUGE}, {"device": HUGE}, {"parent": HUGE}, {"status": "ready", "page": HUGE}],
)
def test_board_filters_beyond_64_bits_are_ignored(personas, query):
    response = client_for(personas.owner).get("/g/research/tasks/", query)

    assert response.status_code == 200
