"""The one way Claw calls a model: the `openai` SDK against the configured OpenAI-compatible
backend (settings CLAW_LLM_*), with explicit timeouts, few retries and per-model sampling
defaults. Server-side callers (the planner, document → skill, the gateway) use these
clients; device agents never hold provider keys and go through the gateway instead."""

from functools import cache

import httpx
import openai
from django.conf import settings

from claw.errors import DomainError

# Sampling defaults by model-name prefix; the first match wins. K2.6 is tuned for 1.0.
SAMPLING_DEFAULTS: list[tuple[str, dict]] = [
    ("kimi-k2", {"temperature": 1.0}),
]


class ModelUnavailable(DomainError):
    status = 503
    code = "model_unavailable"


def configured() -> bool:
    return bool(settings.CLAW_LLM_BASE_URL)


def _timeout() -> httpx.Timeout:
    return httpx.Timeout(
        settings.CLAW_LLM_READ_TIMEOUT_S, connect=settings.CLAW_LLM_CONNECT_TIMEOUT_S
    )


def _check() -> None:
    if not configured():
        raise ModelUnavailable("No model backend is configured (set CLAW_LLM_BASE_URL).")


@cache
def _clients(base_url: str, api_key: str) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    options = {
        "base_url": base_url,
        "api_key": api_key or "none",
        "timeout": _timeout(),
        "max_retries": settings.CLAW_LLM_MAX_RETRIES,
    }
    return openai.OpenAI(**options), openai.AsyncOpenAI(**options)


def client() -> openai.OpenAI:
    _check()
    return _clients(settings.CLAW_LLM_BASE_URL, settings.CLAW_LLM_API_KEY)[0]


def async_client() -> openai.AsyncOpenAI:
    _check()
    return _clients(settings.CLAW_LLM_BASE_URL, settings.CLAW_LLM_API_KEY)[1]


def sampling_defaults(model: str) -> dict:
    """Per-model defaults; CLAW_LLM_TEMPERATURE overrides the configured model's."""
    for prefix, defaults in SAMPLING_DEFAULTS:
        if model.startswith(prefix):
            found = dict(defaults)
            break
    else:
        found = {}
    if model == settings.CLAW_LLM_MODEL:
        found["temperature"] = settings.CLAW_LLM_TEMPERATURE
    return found
