"""Artifact upload and download: humans with the member role, and devices for the running
attempt they hold (fenced by epoch)."""

import hashlib
import io

import pytest

from apps.devices.services import device_revoke
from apps.tasks.models import Artifact, Attempt, AttemptStatus
from apps.tasks.services import (
    artifact_create,
    attempt_accept,
    attempt_lose,
    task_assign,
    task_create,
)
from claw.errors import StaleAttempt
from tests.test_api_support import assert_error, bearer, body, client_for, send, upload


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    return tmp_path


def stored_files(root) -> list:
    return [path for path in root.rglob("*") if path.is_file()]


@pytest.fixture
def running(personas):
    """A task whose attempt (epoch 1) is running on the group's agent."""
    task = task_create(group=personas.group, actor=personas.member, title="Write the report")
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)
    return task, attempt


def test_uploading_the_same_name_again_makes_a_new_version(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Report")
    client = client_for(personas.member)

    first = upload(
        client, task.id, b"# Draft\n", filename="report.md", content_type="text/markdown"
    )
    second = upload(
        client,
        task.id,
        b"# Final\n",
        filename="ignored.md",
        content_type="text/markdown",
        name="report.md",
        kind="document",
    )

    assert first.status_code == 201 and second.status_code == 201, second.content
    v1, v2 = body(first), body(second)
    assert (v1["name"], v1["version"], v1["kind"]) == ("report.md", 1, "file")
    assert (v2["name"], v2["version"], v2["kind"]) == ("report.md", 2, "document")
    assert v2["size"] == 8 and v2["sha256"] == hashlib.sha256(b"# Final\n").hexdigest()
    assert v2["created_by_user_id"] == personas.member.id and v2["attempt_id"] is None
    listed = body(send(client_for(personas.viewer), "GET", f"/tasks/{task.id}/artifacts"))
    assert [(a["name"], a["version"]) for a in listed] == [("report.md", 1), ("report.md", 2)]


def test_an_artifact_downloads_with_its_type_and_as_an_attachment(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Report")
    uploaded = body(
        upload(
            client_for(personas.member),
            task.id,
            b"a,b\n1,2\n",
            filename="numbers.csv",
            content_type="text/csv",
        )
    )
    viewer = client_for(personas.viewer)

    meta = send(viewer, "GET", f"/artifacts/{uploaded['id']}")
    download = viewer.get(body(meta)["download_url"])

    assert body(meta) == uploaded
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == b"a,b\n1,2\n"
    assert download["Content-Type"] == "text/csv"
    assert download["Content-Disposition"] == 'attachment; filename="numbers.csv"'


def test_a_viewer_cannot_upload_and_nothing_is_stored(personas, media_root):
    task = task_create(group=personas.group, actor=personas.member, title="Report")

    response = upload(client_for(personas.viewer), task.id)

    assert_error(response, 403, "forbidden")
    assert not Artifact.objects.exists() and stored_files(media_root) == []


def test_a_person_cannot_upload_as_an_attempt(personas, running):
    task, attempt = running

    response = upload(client_for(personas.member), task.id, attempt_id=attempt.id, epoch=1)

    assert_error(response, 422, "invalid")
    assert not Artifact.objects.exists()


def test_the_device_holding_the_running_attempt_uploads_with_its_token(personas, running):
    task, attempt = running
    device = personas.agent.device

    response = upload(
        client_for(),
        task.id,
        b"log",
        headers=bearer(device.raw_token),
        attempt_id=attempt.id,
        epoch=1,
    )

    assert response.status_code == 201, response.content
    data = body(response)
    assert data["attempt_id"] == attempt.id and data["version"] == 1
    assert data["created_by_agent_id"] == personas.agent.id
    assert data["created_by_user_id"] is None


def test_a_device_upload_with_a_stale_epoch_is_refused(personas, running, media_root):
    task, attempt = running
    token = personas.agent.device.raw_token

    response = upload(client_for(), task.id, headers=bearer(token), attempt_id=attempt.id, epoch=2)

    error = assert_error(response, 409, "stale_attempt")
    assert error["details"] == {"task_epoch": 1, "attempt_status": "running"}
    assert not Artifact.objects.exists() and stored_files(media_root) == []


def test_a_lost_attempt_cannot_upload_after_the_task_moved_on(personas, running):
    task, old = running
    attempt_lose(attempt_id=old.id, reason="lease expired")
    new = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=new.id, agent=personas.agent, epoch=new.epoch)
    token = personas.agent.device.raw_token

    stale = upload(client_for(), task.id, headers=bearer(token), attempt_id=old.id, epoch=1)
    current = upload(client_for(), task.id, headers=bearer(token), attempt_id=new.id, epoch=2)

    assert_error(stale, 409, "stale_attempt")
    assert current.status_code == 201 and body(current)["attempt_id"] == new.id


def test_an_offered_but_unaccepted_attempt_cannot_upload(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Report")
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    token = personas.agent.device.raw_token

    response = upload(client_for(), task.id, headers=bearer(token), attempt_id=attempt.id, epoch=1)

    assert_error(response, 409, "stale_attempt")


def test_a_device_upload_needs_the_attempt_and_epoch(personas, running):
    task, _ = running

    response = upload(client_for(), task.id, headers=bearer(personas.agent.device.raw_token))

    assert_error(response, 422, "attempt_required")


def test_another_device_cannot_upload_for_the_attempt(personas, running):
    task, attempt = running
    stranger = personas.other_agent.device.raw_token

    response = upload(
        client_for(), task.id, headers=bearer(stranger), attempt_id=attempt.id, epoch=1
    )

    assert_error(response, 404, "not_found")
    assert not Artifact.objects.exists()


def test_a_revoked_device_cannot_upload(personas, running):
    task, attempt = running
    device = personas.agent.device
    device_revoke(actor=personas.owner, device=device)

    response = upload(
        client_for(), task.id, headers=bearer(device.raw_token), attempt_id=attempt.id, epoch=1
    )

    assert_error(response, 401, "unauthenticated")


def test_an_attempt_lost_after_it_was_loaded_cannot_add_an_artifact(personas, running, media_root):
    """The fence is re-checked under the task's lock inside artifact_create."""
    _, attempt = running
    loaded = Attempt.objects.select_related("task").get(id=attempt.id)
    attempt_lose(attempt_id=attempt.id, reason="lease expired")
    assert loaded.status == AttemptStatus.RUNNING  # what the caller still believes

    with pytest.raises(StaleAttempt):
        artifact_create(task=loaded.task, name="late.txt", upload=io.BytesIO(b"x"), attempt=loaded)

    assert not Artifact.objects.exists() and stored_files(media_root) == []


def test_another_groups_artifact_is_not_found(personas):
    theirs = task_create(group=personas.other_group, actor=personas.outsider, title="Theirs")
    artifact = artifact_create(
        task=theirs, name="secret.txt", upload=io.BytesIO(b"s"), actor=personas.outsider
    )
    client = client_for(personas.owner)

    assert_error(send(client, "GET", f"/artifacts/{artifact.id}"), 404, "not_found")
    assert_error(send(client, "GET", f"/artifacts/{artifact.id}/download"), 404, "not_found")


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("site.html", "text/html"),
        ("site.html", "text/html; charset=utf-8"),
        ("logo.svg", "image/svg+xml"),
        ("feed.xml", "application/rss+xml"),
    ],
)
def test_a_download_never_renders_an_active_document_in_our_origin(
    personas, filename, content_type
):
    task = task_create(group=personas.group, actor=personas.member, title="Site")
    uploaded = body(
        upload(
            client_for(personas.member),
            task.id,
            b"<script>steal()</script>",
            filename=filename,
            content_type=content_type,
        )
    )

    download = client_for(personas.viewer).get(uploaded["download_url"])

    assert download.status_code == 200
    assert download["Content-Type"] == "application/octet-stream"
    assert download["Content-Disposition"].startswith("attachment")
    assert download["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert download["X-Content-Type-Options"] == "nosniff"
    assert b"".join(download.streaming_content) == b"<script>steal()</script>"


def test_a_passive_download_keeps_its_type_under_the_sandbox(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Shot")
    uploaded = body(
        upload(
            client_for(personas.member),
            task.id,
            b"\x89PNG",
            filename="a.png",
            content_type="image/png",
        )
    )

    download = client_for(personas.viewer).get(uploaded["download_url"])

    assert download["Content-Type"] == "image/png"
    assert download["Content-Disposition"] == 'attachment; filename="a.png"'
    assert download["Content-Security-Policy"] == "default-src 'none'; sandbox"
