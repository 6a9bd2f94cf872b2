"""The one way Claw calls a model: the `openai` SDK against the configured OpenAI-compatible
backend (settings CLAW_LLM_*), with explicit timeouts, few retries and per-model sampling
defaults. Server-side callers (the planner, document → skill, the gateway) use these
clients; device agents never hold provider keys and go through the gateway instead."""

import json
import logging
import time
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

from django.conf import settings

from claw.errors import DomainError, InvalidInput

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported when first used: ~25 MB that most processes never need
    import openai

# Sampling defaults by model-name prefix; the first match wins. K2.6 is tuned for 1.0.
SAMPLING_DEFAULTS: list[tuple[str, dict]] = [
    ("kimi-k2", {"temperature": 1.0}),
]


class ModelUnavailable(DomainError):
    status = 503
    code = "model_unavailable"


def configured() -> bool:
    return bool(settings.CLAW_LLM_BASE_URL)


def _timeout():
    import httpx

    return httpx.Timeout(
        settings.CLAW_LLM_READ_TIMEOUT_S, connect=settings.CLAW_LLM_CONNECT_TIMEOUT_S
    )


def _check() -> None:
    if not configured():
        raise ModelUnavailable("No model backend is configured (set CLAW_LLM_BASE_URL).")


@cache
def _clients(base_url: str, api_key: str) -> "tuple[openai.OpenAI, openai.AsyncOpenAI]":
    import openai

    options = {
        "base_url": base_url,
        "api_key": api_key or "none",
        "timeout": _timeout(),
        "max_retries": settings.CLAW_LLM_MAX_RETRIES,
    }
    return openai.OpenAI(**options), openai.AsyncOpenAI(**options)


def client() -> "openai.OpenAI":
    _check()
    return _clients(settings.CLAW_LLM_BASE_URL, settings.CLAW_LLM_API_KEY)[0]


def async_client() -> "openai.AsyncOpenAI":
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


def complete_json(
    *, messages: list[dict], name: str, schema: dict, max_tokens: int
) -> tuple[str, dict]:
    """One structured-output call with the configured model: `response_format` json_schema
    (strict), streamed (a long think sends nothing for minutes otherwise, and the client's
    read timeout is between bytes). Returns the answer's text and the usage; the caller
    parses (parse_json) and validates it, since a backend may not enforce the schema."""
    model = settings.CLAW_LLM_MODEL
    stream = client().chat.completions.create(
        model=model,
        messages=messages,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        **sampling_defaults(model),
    )
    parts, usage = [], {}
    with stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.model_dump(exclude_none=True)
            for choice in chunk.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
    return "".join(parts), usage


def parse_json(content: str | None, *, what: str):
    """A model's JSON answer (a fenced block tolerated), or InvalidInput saying what is
    wrong in words the model can act on; `what` names the expected object."""
    text = (content or "").strip()
    if text.startswith("```"):  # a fenced block despite the instructions
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    if not text:
        raise InvalidInput(f"The answer was empty; answer with {what}.")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"The answer is not valid JSON ({exc}).") from None


def complete_validated(
    *,
    messages: list[dict],
    name: str,
    schema: dict,
    max_tokens: int,
    validate: Callable[[Any], Any],
    what: str,
) -> tuple[Any, str, list[dict]]:
    """Ask for a JSON object (complete_json) and validate it; an invalid answer is asked
    again once, with the error for the model to correct. Returns (the validated value or
    None, the error when None, the usage of each call with its latency_ms). A backend that
    fails or is not configured is not asked again here: the SDK has already retried."""
    messages = list(messages)
    usage: list[dict] = []
    error = ""
    for attempt in range(2):
        started = time.monotonic()
        try:
            content, used = complete_json(
                messages=messages, name=name, schema=schema, max_tokens=max_tokens
            )
        except ModelUnavailable as exc:
            return None, exc.message, usage
        except Exception as exc:  # the model backend failed (after the SDK's retries)
            logger.warning("%s: the model call failed: %s", name, exc)
            return None, f"the model call failed: {type(exc).__name__}: {exc}"[:2000], usage
        usage.append({**used, "latency_ms": round((time.monotonic() - started) * 1000)})
        try:
            return validate(parse_json(content, what=what)), "", usage
        except InvalidInput as exc:
            error = exc.message
            if attempt == 0:
                messages += [
                    {"role": "assistant", "content": content or ""},
                    {
                        "role": "user",
                        "content": f"That {name} is invalid: {exc.message}\n"
                        "Answer again with the corrected JSON object only.",
                    },
                ]
    return None, error, usage
