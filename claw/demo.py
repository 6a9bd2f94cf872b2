"""`claw up --demo`: a demo owner, a demo group, three paired demo devices with an agent
each (separate processes), and a fresh task graph with explicit steps for them to run.

The user and group are created once; each run gives the user a fresh random password
(which `claw up` prints) and adds a new demo graph. The devices are paired through the
same services a real device uses, and their agents are ordinary `claw agent run`
processes, so what the demo shows is what a real deployment does."""

import logging
import os
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections, transaction

from apps.devices.models import Device
from apps.devices.services import device_pair, pairing_code_create
from apps.groups.models import Group, Membership, Role
from apps.groups.services import group_create
from apps.tasks.models import Task, TaskStatus
from apps.tasks.services import task_create
from claw.device.config import DeviceConfig, load_config, save_config
from claw.tokens import token_hash

logger = logging.getLogger(__name__)

DEMO_USERNAME = "demo"
DEMO_GROUP_SLUG = "demo"
DEMO_GROUP_NAME = "Demo group"
DEMO_COMPLETE = "demo complete"


@dataclass(frozen=True)
class DemoAgent:
    device: str
    kind: str
    toolkits: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.device}-agent"


DEMO_AGENTS = (
    DemoAgent("demo-laptop", "laptop", ("shell", "python")),
    DemoAgent("demo-cloud", "cloud", ("python", "http")),
    DemoAgent("demo-phone", "phone", ("files",)),
)


@dataclass(frozen=True)
class Demo:
    username: str
    password: str
    group: Group
    task_ids: list[int] = field(default_factory=list)


def _demo_graph(*, group: Group, actor, server_url: str) -> list[int]:
    run = Task.objects.filter(group=group, title__endswith="write the report").count() + 1
    facts = task_create(
        group=group,
        actor=actor,
        title=f"Demo {run}: gather facts about this machine",
        instructions="Runs on the laptop agent: a shell command and a Python snippet.",
        required_toolkits=["shell", "python"],
        priority=10,
        steps=[
            {"tool": "shell.run", "args": {"cmd": "uname -sm && date -u"}},
            {
                "tool": "python.run",
                "args": {"code": "import platform; print(platform.python_version())"},
            },
        ],
    )
    health = task_create(
        group=group,
        actor=actor,
        title=f"Demo {run}: read the platform's API description",
        instructions="Runs on the cloud agent: fetch the OpenAPI document, count in Python.",
        required_toolkits=["http", "python"],
        steps=[
            {"tool": "http.get", "args": {"url": f"{server_url}api/v1/openapi.json"}},
            {
                "tool": "python.run",
                "args": {"code": "print('the API describes groups, tasks and checkpoints')"},
            },
        ],
    )
    report = task_create(
        group=group,
        actor=actor,
        title=f"Demo {run}: write the report",
        instructions="Runs on the phone agent once both tasks above have succeeded.",
        required_toolkits=["files"],
        depends_on=[facts.id, health.id],
        steps=[
            {
                "tool": "files.write",
                "args": {
                    "path": f"demo-{run}-report.md",
                    "content": f"# Demo run {run}\n\nFacts gathered, health checked.\n",
                },
            },
            {"tool": "files.read", "args": {"path": f"demo-{run}-report.md"}},
        ],
    )
    return [facts.id, health.id, report.id]


def _demo_device_config(*, group: Group, owner, agent: DemoAgent, server_url: str) -> Path:
    """The demo device's config file, paired once and re-paired if it was revoked."""
    path = Path(settings.DATA_DIR) / "demo" / agent.device / "device.json"
    try:
        config = load_config(path)
        if Device.objects.filter(
            id=config.device_id, token_hash=token_hash(config.token), revoked_at=None
        ).exists():
            if config.server != server_url:
                save_config(DeviceConfig(**{**config.__dict__, "server": server_url}), path)
            return path
    except Exception:  # missing, unreadable or stale: pair again
        logger.info("pairing demo device %s", agent.device)
    _, code = pairing_code_create(actor=owner, group=group)
    device, token = device_pair(code=code, name=agent.device, kind=agent.kind, platform="demo")
    save_config(
        DeviceConfig(
            server=server_url,
            device_id=device.id,
            token=token,
            name=agent.device,
            kind=agent.kind,
            group_id=group.id,
        ),
        path,
    )
    return path


def demo_ensure(*, server_url: str) -> Demo:
    password = secrets.token_urlsafe(12)
    with transaction.atomic():
        user, _ = get_user_model().objects.get_or_create(
            username=DEMO_USERNAME, defaults={"email": "demo@example.com"}
        )
        user.set_password(password)
        user.is_active = True
        # The local demo owner may use the admin (claw up refuses --demo in production).
        user.is_staff = user.is_superuser = True
        user.save()
    group = Group.objects.filter(slug=DEMO_GROUP_SLUG).first()
    if group is None:
        group = group_create(user=user, name=DEMO_GROUP_NAME, slug=DEMO_GROUP_SLUG)
    elif not Membership.objects.filter(group=group, user=user).exists():
        # Seed data repairing itself: there is no owner to act for it, so no service call.
        Membership.objects.create(group=group, user=user, role=Role.OWNER)
    for agent in DEMO_AGENTS:
        _demo_device_config(group=group, owner=user, agent=agent, server_url=server_url)
    task_ids = _demo_graph(group=group, actor=user, server_url=server_url)
    return Demo(username=DEMO_USERNAME, password=password, group=group, task_ids=task_ids)


class DemoAgents:
    """The three demo agents as child processes, and a watcher that prints
    DEMO_COMPLETE once the demo graph has succeeded."""

    def __init__(self, demo: Demo, *, server_url: str) -> None:
        self.demo = demo
        self.server_url = server_url
        self.processes: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        logs = Path(settings.DATA_DIR) / "demo"
        for agent in DEMO_AGENTS:
            config = logs / agent.device / "device.json"
            command = [sys.executable, "-m", "claw.device", "agent", "run"]
            command += ["--name", agent.name, "--config", str(config)]
            for toolkit in agent.toolkits:
                command += ["--toolkit", toolkit]
            log = (logs / f"{agent.name}.log").open("a")
            self.processes[agent.name] = subprocess.Popen(  # noqa: S603 - our own module
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
            )
        names = ", ".join(f"{a.name} ({'+'.join(a.toolkits)})" for a in DEMO_AGENTS)
        print(f"claw: demo agents started: {names}; logs in {logs}", flush=True)
        self._watcher = threading.Thread(target=self._watch, name="demo-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        try:
            while not self._stop.wait(1.0):
                statuses = set(
                    Task.objects.filter(id__in=self.demo.task_ids).values_list("status", flat=True)
                )
                if statuses == {TaskStatus.SUCCEEDED}:
                    print(
                        f"claw: {DEMO_COMPLETE}: three agents on three devices ran the demo "
                        f"graph. Watch it in the dashboard at {self.server_url}g/"
                        f"{self.demo.group.slug}/tasks/ (signed in as {self.demo.username}).",
                        flush=True,
                    )
                    return
        finally:
            close_old_connections()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
