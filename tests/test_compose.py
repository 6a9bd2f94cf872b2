"""compose.yaml: the gpu profile's sglang service, and how web and worker reach a model."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from claw.serving import SGLANG_VERSION
from tests.test_model_plan import parse_flags

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "web", "worker", "beat")
REQUIRED = {"CLAW_SECRET_KEY": "x" * 50, "POSTGRES_PASSWORD": "pw"}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^${}]*))?\}")


def interpolate(value, env):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, innermost first; $$ stays $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match):
        name, op, arg = match.groups()
        current = env.get(name)
        unset = current is None or (current == "" and op and op.startswith(":"))
        if op and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        return (arg or "") if unset else current

    text = value.replace("$$", "\0")
    while VARIABLE.search(text):
        text = VARIABLE.sub(one, text)
    return text.replace("\0", "$")


def service(name, **env):
    return interpolate(SERVICES[name], {**REQUIRED, **env})


def test_sglang_runs_only_in_the_gpu_profile():
    assert SERVICES["sglang"]["profiles"] == ["gpu"]
    assert [name for name, s in SERVICES.items() if "profiles" in s] == ["sglang"]


def test_sglang_reserves_the_hosts_nvidia_gpus():
    (device,) = SERVICES["sglang"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == "all"


def test_sglang_gets_shared_memory_like_sglangs_own_docker_instructions():
    sglang = SERVICES["sglang"]
    assert sglang["shm_size"] == "32g"
    assert sglang["ipc"] == "host"


def test_sglang_is_healthy_once_health_answers_after_a_long_start():
    check = SERVICES["sglang"]["healthcheck"]
    assert "http://localhost:30000/health'" in " ".join(check["test"])
    minutes = re.fullmatch(r"(\d+)m", check["start_period"])
    assert minutes and int(minutes.group(1)) >= 30  # ~600 GB of weights load for minutes


def test_model_weights_persist_in_the_hugging_face_cache_volume():
    assert "hfcache:/root/.cache/huggingface" in SERVICES["sglang"]["volumes"]
    assert "hfcache" in COMPOSE["volumes"]


def test_sglang_is_pinned_and_launched_with_verified_kimi_flags():
    sglang = service("sglang")
    assert sglang["image"] == f"lmsysorg/sglang:v{SGLANG_VERSION}"
    flags = parse_flags(sglang["command"])
    assert flags["--model-path"] == ["moonshotai/Kimi-K2.6"]
    assert flags["--served-model-name"] == ["kimi-k2.6"]
    assert flags["--tp-size"] == flags["--ep-size"] == ["8"]
    assert flags["--tool-call-parser"] == flags["--reasoning-parser"] == ["kimi_k2"]
    assert flags["--context-length"] == ["262144"]
    assert flags["--host"] == ["0.0.0.0"]  # noqa: S104 - a value in SGLang's argv
    assert flags["--port"] == ["30000"]
    assert "--trust-remote-code" in flags and "--enable-metrics" in flags


def test_sglangs_served_name_follows_the_model_claw_asks_for():
    flags = parse_flags(service("sglang", CLAW_LLM_MODEL="kimi-k2.6-ours")["command"])
    assert flags["--served-model-name"] == ["kimi-k2.6-ours"]
    assert service("web", CLAW_LLM_MODEL="kimi-k2.6-ours")["environment"]["CLAW_LLM_MODEL"] == (
        "kimi-k2.6-ours"
    )


def test_sglang_is_published_on_the_hosts_loopback_only():
    assert service("sglang")["ports"] == ["127.0.0.1:30000:30000"]


def test_web_and_worker_reach_sglang_when_pointed_at_it():
    url = "http://sglang:30000/v1"  # docs/serving.md: the .env line for the gpu profile
    for name in ("web", "worker"):
        environment = service(name, CLAW_LLM_BASE_URL=url)["environment"]
        assert environment["CLAW_LLM_BASE_URL"] == url
        assert environment["CLAW_LLM_MODEL"] == "kimi-k2.6"
    assert "sglang" in SERVICES  # the host name in that URL


def test_without_a_model_url_the_model_features_stay_off():
    environment = service("web")["environment"]
    assert environment["CLAW_LLM_BASE_URL"] == ""
    assert environment["CLAW_LLM_API_KEY"] == ""


def test_web_and_worker_can_use_moonshots_api_instead():
    environment = service(
        "worker", CLAW_LLM_BASE_URL="https://api.moonshot.ai/v1", CLAW_LLM_API_KEY="sk-1"
    )["environment"]
    assert environment["CLAW_LLM_BASE_URL"] == "https://api.moonshot.ai/v1"
    assert environment["CLAW_LLM_API_KEY"] == "sk-1"


def test_the_existing_services_are_unchanged_apart_from_the_model_settings():
    assert set(SERVICES) == {"postgres", "redis", "migrate", "web", "worker", "beat", "sglang"}
    assert SERVICES["postgres"]["image"] == "postgres:16"
    assert SERVICES["redis"]["image"] == "redis:7"
    llm = {"CLAW_LLM_BASE_URL", "CLAW_LLM_API_KEY", "CLAW_LLM_MODEL"}
    for name in APP_SERVICES:
        app = SERVICES[name]
        assert app["image"] == "claw:latest"
        assert set(app["environment"]) - llm == {
            "CLAW_PRODUCTION", "CLAW_SECRET_KEY", "CLAW_ALLOWED_HOSTS",
            "CLAW_CSRF_TRUSTED_ORIGINS", "CLAW_SECURE_SSL_REDIRECT", "CLAW_DATABASE_URL",
            "CLAW_REDIS_URL", "CLAW_LOG_LEVEL", "CLAW_METRICS_DIR", "CLAW_METRICS_TOKEN",
        }  # fmt: skip
        # Claw starts without the gpu profile: nothing waits for sglang.
        assert "sglang" not in app.get("depends_on", {})
    assert SERVICES["web"]["command"][:3] == ["python", "-m", "claw.web"]  # Daphne, no TLS
    assert SERVICES["worker"]["command"][:4] == ["celery", "-A", "claw", "worker"]
    assert SERVICES["beat"]["deploy"] == {"replicas": 1}


def docker_compose_works() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not docker_compose_works(), reason="docker compose is not installed")
def test_docker_compose_accepts_the_gpu_profile():
    env = {**os.environ, **REQUIRED, "CLAW_LLM_BASE_URL": "http://sglang:30000/v1"}
    result = subprocess.run(
        ["docker", "compose", "-f", "compose.yaml", "--profile", "gpu", "config", "--format",
         "json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)["services"]
    assert config["sglang"]["command"] == service("sglang")["command"]
    assert config["web"]["environment"]["CLAW_LLM_BASE_URL"] == "http://sglang:30000/v1"
