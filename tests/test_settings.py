"""Settings per run mode, in subprocesses (settings are read once per process): bad values
fail loudly, production passes Django's deploy checks, Celery is configured for reliable
work, and compose.yaml describes a sound services deployment."""

import json
import secrets
import subprocess

import pytest
import yaml
from django.conf import settings

from claw.celery import app as celery_app
from tests.live import PYTHON, ROOT, child_env

PRODUCTION = {
    "CLAW_PRODUCTION": "1",
    "CLAW_SECRET_KEY": secrets.token_urlsafe(60)[:60],
    "CLAW_ALLOWED_HOSTS": "claw.example.com",
}

SHOW_SETTINGS = """
import json
from django.conf import settings
layer = settings.CHANNEL_LAYERS["default"]
print(json.dumps({
    "embedded": settings.EMBEDDED,
    "broker": settings.CELERY_BROKER_URL,
    "queue": settings.CELERY_TASK_DEFAULT_QUEUE,
    "layer": layer["BACKEND"],
    "layer_hosts": layer.get("CONFIG", {}).get("hosts"),
    "database": settings.DATABASES["default"]["ENGINE"],
    "debug": settings.DEBUG,
    "login_url": settings.LOGIN_URL,
}, default=str))
"""


def run_python(code: str, tmp_path, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", "import django; django.setup()\n" + code],
        env=child_env(
            DJANGO_SETTINGS_MODULE="claw.settings", CLAW_DATA_DIR=str(tmp_path / "data"), **env
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def shown(tmp_path, **env: str | None) -> dict:
    result = run_python(SHOW_SETTINGS, tmp_path, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLAW_DATABASE_URL", "mysql://x"),
        ("CLAW_DATABASE_URL", "postgresql://host-but-no-database"),
        ("CLAW_REDIS_URL", "http://x"),
        ("CLAW_DEBUG", "maybe"),
        ("CLAW_PRODUCTION", "yes please"),
        ("CLAW_BEAT_TICK_SECONDS", "0"),
        ("CLAW_SECRET_KEY", "too-short"),
    ],
)
def test_a_bad_value_fails_loudly_naming_the_variable(tmp_path, variable, value):
    result = run_python("", tmp_path, **{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert variable in result.stderr.strip().splitlines()[-1]


def test_a_redis_socket_timeout_at_the_blocking_pop_is_refused(tmp_path):
    result = run_python(
        "", tmp_path, CLAW_REDIS_URL="redis://127.0.0.1:6379/0", CLAW_REDIS_SOCKET_TIMEOUT="5"
    )
    assert result.returncode != 0
    assert "CLAW_REDIS_SOCKET_TIMEOUT must be >= 10" in result.stderr


@pytest.mark.parametrize("missing", ["CLAW_SECRET_KEY", "CLAW_ALLOWED_HOSTS"])
def test_production_requires_a_secret_key_and_allowed_hosts(tmp_path, missing):
    result = run_python("", tmp_path, **{**PRODUCTION, missing: None})
    assert result.returncode != 0
    assert missing in result.stderr.strip().splitlines()[-1]


def test_production_settings_pass_the_deploy_checks(tmp_path):
    result = subprocess.run(
        [PYTHON, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=child_env(CLAW_DATA_DIR=str(tmp_path / "data"), **PRODUCTION),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_embedded_mode_is_what_you_get_with_nothing_configured(tmp_path):
    values = shown(tmp_path)
    assert values["embedded"] is True
    assert values["broker"].startswith("memory://")
    assert values["layer"] == "claw.embedded.InProcessChannelLayer"
    assert values["database"] == "django.db.backends.sqlite3"
    assert values["debug"] is False
    assert values["login_url"] == "/login/"
    assert (tmp_path / "data" / "secret_key").exists()


def test_debug_is_on_only_when_asked_for(tmp_path):
    assert shown(tmp_path, CLAW_DEBUG="1")["debug"] is True


def test_services_mode_uses_redis_with_a_socket_timeout_above_the_blocking_pop(tmp_path):
    values = shown(
        tmp_path,
        CLAW_DATABASE_URL="postgresql://claw@db.invalid:5432/claw",
        CLAW_REDIS_URL="redis://redis.invalid:6379/0",
        CLAW_CELERY_QUEUE="claw-a",
    )
    assert values["embedded"] is False
    assert values["broker"] == "redis://redis.invalid:6379/0"
    assert values["queue"] == "claw-a"
    assert values["layer"] == "channels_redis.core.RedisChannelLayer"
    assert values["database"] == "django.db.backends.postgresql"
    (host,) = values["layer_hosts"]
    # channels_redis blocks 5 s in BZPOPMIN; a socket timeout <= 5 s kills idle consumers.
    assert host["socket_timeout"] > 5
    assert host["max_connections"] >= 100


def test_celery_is_configured_for_work_that_survives_a_dying_worker():
    conf = celery_app.conf
    assert conf.task_acks_late is True
    assert conf.worker_prefetch_multiplier == 1
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_ignore_result is True
    assert conf.worker_hijack_root_logger is False
    assert conf.broker_url == settings.CELERY_BROKER_URL
    if not settings.EMBEDDED:
        assert conf.broker_transport_options["visibility_timeout"] >= 3600


def test_beat_schedules_the_tick_every_configured_interval():
    celery_app.finalize()
    assert "claw.beat_tick" in celery_app.tasks
    entry = celery_app.conf.beat_schedule["beat tick"]
    assert entry["task"] == "claw.beat_tick"
    assert entry["schedule"] == settings.CELERY_BEAT_TICK_SECONDS


# --- compose.yaml -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_every_service(compose):
    assert set(compose["services"]) >= {"postgres", "redis", "migrate", "web", "worker", "beat"}


def test_compose_runs_exactly_one_beat(compose):
    beat = compose["services"]["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in beat
    assert "beat" in beat["command"]


def test_compose_services_have_healthchecks(compose):
    for name in ("postgres", "redis", "web", "worker", "beat"):
        assert compose["services"][name]["healthcheck"]["test"], name


def test_compose_app_services_wait_for_migrations_and_healthy_backends(compose):
    services = compose["services"]
    assert services["migrate"]["restart"] == "no"
    assert "manage.py migrate" in " ".join(services["migrate"]["command"])
    for name in ("migrate", "web", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
    for name in ("web", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        ), name


def test_compose_configures_production_services_mode_from_the_environment(compose):
    for name in ("migrate", "web", "worker", "beat"):
        env = compose["services"][name]["environment"]
        assert env["CLAW_PRODUCTION"] == "1", name
        for variable in ("CLAW_SECRET_KEY", "CLAW_DATABASE_URL", "CLAW_REDIS_URL"):
            assert env[variable].startswith("${" + variable), (name, variable)


def test_dockerfile_builds_the_app_with_static_files():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "pip install ." in dockerfile
    assert "collectstatic --noinput" in dockerfile
    assert "\nUSER " in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)


def test_django_processes_enqueue_on_claws_celery_app():
    from celery import current_app

    from apps.events.tasks import beat_tick

    assert current_app.main == "claw"
    assert beat_tick.app.main == "claw"


@pytest.mark.parametrize(
    ("program", "pooled"),
    [
        ("/srv/claw/.venv/bin/celery", False),
        ("/srv/claw/.venv/lib/python3.11/site-packages/celery/__main__.py", False),
        ("/srv/claw/claw/web.py", True),
        ("/srv/claw/.venv/bin/claw", True),
    ],
)
def test_celery_processes_keep_plain_connections_web_processes_pool(monkeypatch, program, pooled):
    from claw import settings as claw_settings

    monkeypatch.setattr("sys.argv", [program])
    monkeypatch.delenv("CLAW_DB_POOL", raising=False)
    assert (claw_settings.database_pool() is not None) is pooled
