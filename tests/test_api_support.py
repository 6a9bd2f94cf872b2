"""Helpers shared by the tests/test_api_*.py modules (this module has no tests itself)."""

import io
import json
from functools import cached_property

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from apps.checkpoints.services import checkpoint_raise
from apps.devices.services import pairing_code_create
from apps.groups.models import Membership, Role
from apps.groups.services import api_token_create
from apps.tasks.services import artifact_create, task_cancel, task_create
from tests.conftest import make_user

API = "/api/v1"
PERSONAS = ("owner", "approver", "member", "viewer", "outsider", "anonymous")


def client_for(user=None, *, enforce_csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf)
    if user is not None:
        client.force_login(user)
    return client


def bearer(raw: str) -> dict:
    return {"Authorization": f"Bearer {raw}"}


def send(client: Client, method: str, path: str, body=None, **kwargs):
    """One API call: `body` is the JSON body (POST/PATCH/DELETE; None sends `{}`)
    or the query string (GET)."""
    url = API + path
    method = method.lower()
    if method == "get":
        return client.get(url, body or {}, **kwargs)
    payload = {} if body is None else body
    return getattr(client, method)(url, payload, content_type="application/json", **kwargs)


def upload(
    client: Client,
    task_id: int,
    content: bytes = b"hello",
    *,
    filename: str = "notes.txt",
    content_type: str = "text/plain",
    headers: dict | None = None,
    **fields,
):
    """A multipart artifact upload; `fields` are the form fields (name, kind, attempt_id...)."""
    data = {"file": SimpleUploadedFile(filename, content, content_type=content_type), **fields}
    return client.post(f"{API}/tasks/{task_id}/artifacts", data, headers=headers or {})


def body(response) -> dict:
    return json.loads(response.content)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    data = body(response)
    assert data["code"] == code, data
    assert isinstance(data["message"], str) and data["message"]
    return data


class World:
    """Everything the endpoints need, built lazily through the services on top of
    `personas`, so each test pays only for the objects it touches."""

    def __init__(self, personas):
        self.p = personas

    @cached_property
    def task(self):
        return task_create(group=self.p.group, actor=self.p.owner, title="Write the report")

    @cached_property
    def other_task(self):
        return task_create(group=self.p.group, actor=self.p.owner, title="Gather sources")

    @cached_property
    def cancelled(self):
        task = task_create(group=self.p.group, actor=self.p.owner, title="Old idea")
        task_cancel(actor=self.p.owner, task=task)
        return task

    @cached_property
    def checkpoint(self):
        return checkpoint_raise(
            group=self.p.group, title="Ship it?", source="human", task=self.task
        )

    @cached_property
    def plan(self):
        """A pending plan checkpoint on `task`, as the planner raises it."""
        return checkpoint_raise(
            group=self.p.group,
            title="Plan: Write the report",
            source="planner",
            kind="plan",
            task=self.task,
            proposal={"summary": "Two steps", "tasks": [{"title": "Outline"}]},
        )

    @cached_property
    def artifact(self):
        return artifact_create(
            task=self.task,
            name="report.md",
            upload=io.BytesIO(b"# Report\n"),
            content_type="text/markdown",
            actor=self.p.owner,
        )

    @cached_property
    def extra(self):
        """A second plain member, for the member-management endpoints to act on."""
        user = make_user("extra")
        Membership.objects.create(group=self.p.group, user=user, role=Role.MEMBER)
        return user

    @cached_property
    def newbie(self):
        return make_user("newbie")

    @property
    def device(self):
        return self.p.agent.device

    @cached_property
    def pairing_code(self) -> str:
        return pairing_code_create(actor=self.p.owner, group=self.p.group)[1]

    def token_for(self, user):
        return api_token_create(user=user, name="laptop")[0]


def make_world(personas) -> World:
    return World(personas)
