"""The HTTP JSON API at /api/v1/: the NinjaAPI instance, how callers authenticate, and how
every error becomes `{"code": ..., "message": ...}` (+ "details"). The routers and their
schemas live in apps/<app>/api.py; they call services and selectors and nothing else."""

import functools
import json
import logging

from django.core.exceptions import ObjectDoesNotExist, RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.http.multipartparser import MultiPartParserError
from django.urls import URLPattern
from ninja import NinjaAPI, Router
from ninja.errors import AuthenticationError, AuthorizationError, HttpError, ValidationError
from ninja.security import HttpBearer, SessionAuth
from ninja.utils import check_csrf

from apps.checkpoints.api import router as checkpoints_router
from apps.devices.api import router as devices_router
from apps.devices.models import Device
from apps.devices.services import device_authenticate
from apps.events.api import router as events_router
from apps.groups.api import router as groups_router
from apps.groups.services import api_token_authenticate
from apps.tasks.api import artifact_upload_router, artifacts_router
from apps.tasks.api import router as tasks_router
from claw.errors import DomainError, Forbidden, NotFound, database_unavailable

logger = logging.getLogger(__name__)

# Token prefixes (claw.tokens.new_token): personal API tokens and device tokens.
PERSONAL_PREFIX = "clawp_"
DEVICE_PREFIX = "clawd_"

# Domain codes whose HTTP status differs from their error class's default.
STATUS_BY_CODE = {"too_large": 413}
HTTP_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


# --- authentication ----------------------------------------------------------------------


class PersonalTokenAuth(HttpBearer):
    """`Authorization: Bearer clawp_…`: a person's API token. A header the browser never
    sends on its own, so no CSRF check."""

    def authenticate(self, request: HttpRequest, token: str):
        if not token.startswith(PERSONAL_PREFIX):
            return None
        return api_token_authenticate(raw=token)


class DeviceTokenAuth(HttpBearer):
    """`Authorization: Bearer clawd_…`: a paired, unrevoked device. `request.auth` is the
    Device, not a user; only endpoints mounted with DEVICE_OR_HUMAN_AUTH accept it."""

    def authenticate(self, request: HttpRequest, token: str) -> Device | None:
        if not token.startswith(DEVICE_PREFIX):
            return None
        return device_authenticate(raw_token=token)


class CsrfSessionAuth(SessionAuth):
    """The Django session cookie, CSRF-checked for unsafe methods. Unlike ninja's
    SessionAuth the check runs only once the session is known to be signed in, so an
    anonymous caller gets 401 unauthenticated rather than a CSRF 403."""

    def __call__(self, request: HttpRequest):
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if not getattr(request, "_ninja_csrf_exempt", False) and check_csrf(request):
            raise Forbidden(
                "CSRF check failed: send the csrftoken cookie's value as X-CSRFToken.",
                code="csrf_failed",
            )
        return user


personal_token_auth = PersonalTokenAuth()
device_token_auth = DeviceTokenAuth()
session_auth = CsrfSessionAuth()

# Tokens first: a request that carries one is never judged by its cookies.
HUMAN_AUTH = [personal_token_auth, session_auth]
DEVICE_OR_HUMAN_AUTH = [personal_token_auth, device_token_auth, session_auth]


class ClawAPI(NinjaAPI):
    """NinjaAPI whose wrong-method answers are JSON too: ninja's path views return a plain
    HttpResponseNotAllowed without going through the exception handlers."""

    def _get_urls(self) -> list:
        urls = super()._get_urls()
        for pattern in urls:
            if isinstance(pattern, URLPattern):
                pattern.callback = _json_method_not_allowed(pattern.callback)
        return urls


def _json_method_not_allowed(view):
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        response = view(request, *args, **kwargs)
        if isinstance(response, HttpResponseNotAllowed):
            allowed = response["Allow"]
            response = error_response(
                request,
                status=405,
                code="method_not_allowed",
                message=f"{request.method} is not allowed here; use {allowed}.",
            )
            response["Allow"] = allowed
        return response

    return wrapper


api = ClawAPI(
    title="Claw API",
    version="1",
    description="Groups of humans and AI agents working on shared task graphs.",
    urls_namespace="api",
    auth=HUMAN_AUTH,
)


# --- errors: always {"code", "message"[, "details"]} ------------------------------------


def error_response(
    request: HttpRequest, *, status: int, code: str, message: str, details: dict | None = None
) -> HttpResponse:
    body: dict = {"code": code, "message": message}
    if details:
        body["details"] = details
    return api.create_response(request, body, status=status)


@api.exception_handler(DomainError)
def on_domain_error(request: HttpRequest, exc: DomainError) -> HttpResponse:
    status = STATUS_BY_CODE.get(exc.code, exc.status)
    return api.create_response(request, exc.as_dict(), status=status)


def _field_name(loc: tuple) -> str:
    """("body", "payload", "steps", 0, "tool") -> "steps.0.tool"; ("query", "limit") ->
    "limit". Body schemas are always the view's `payload` parameter."""
    parts = list(loc[1:])
    if loc and loc[0] == "body" and parts and parts[0] == "payload":
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or str(loc[0] if loc else "request")


def _keyed_item(request: HttpRequest, loc: tuple, parsed: dict) -> dict:
    """For an error inside an item of a body list whose items have keys (a task graph's
    tasks: ("body", "payload", "tasks", 3, "title")), the item's key and index."""
    if len(loc) < 4 or loc[:2] != ("body", "payload") or not isinstance(loc[3], int):
        return {}
    if "body" not in parsed:  # once per answer
        try:
            parsed["body"] = json.loads(request.body)
        except ValueError:
            parsed["body"] = None
    items = parsed["body"].get(loc[2]) if isinstance(parsed["body"], dict) else None
    if not isinstance(items, list) or not 0 <= loc[3] < len(items):
        return {}
    key = items[loc[3]].get("key") if isinstance(items[loc[3]], dict) else None
    return {"key": key, "index": loc[3]} if isinstance(key, str) else {}


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    parsed: dict = {}
    errors = [
        {
            "field": _field_name(tuple(error.get("loc", ()))),
            "in": str(error["loc"][0]) if error.get("loc") else "request",
            "message": error.get("msg", "invalid"),
            "type": error.get("type", "invalid"),
            **_keyed_item(request, tuple(error.get("loc", ())), parsed),
        }
        for error in exc.errors
    ]
    first = errors[0] if errors else {"field": "request", "message": "invalid"}
    named = {name: first[name] for name in ("key", "index") if name in first}
    where = f" ({first['key']})" if named else ""
    return error_response(
        request,
        status=422,
        code="validation_error",
        message=f"{first['field']}{where}: {first['message']}",
        details={"errors": errors, **named},
    )


@api.exception_handler(AuthenticationError)
def on_unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(
        request,
        status=401,
        code="unauthenticated",
        message="Sign in, or send Authorization: Bearer <token>.",
    )


@api.exception_handler(AuthorizationError)
def on_unauthorized(request: HttpRequest, exc: AuthorizationError) -> HttpResponse:
    return error_response(request, status=403, code="forbidden", message=str(exc))


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if exc.status_code == 400 and str(exc).startswith("Cannot parse request body"):
        return error_response(
            request, status=400, code="invalid_json", message="The request body is not valid JSON."
        )
    code = HTTP_ERROR_CODES.get(exc.status_code, "error")
    return error_response(request, status=exc.status_code, code=code, message=str(exc))


@api.exception_handler(Http404)
@api.exception_handler(ObjectDoesNotExist)
def on_not_found(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(request, status=404, code="not_found", message="Not found.")


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(
        request, status=413, code="too_large", message="The request body is too large."
    )


@api.exception_handler(MultiPartParserError)
def on_bad_multipart(request: HttpRequest, exc: MultiPartParserError) -> HttpResponse:
    return error_response(
        request,
        status=400,
        code="bad_multipart",
        message=f"The multipart/form-data body cannot be read: {exc}",
    )


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    unavailable = database_unavailable(exc)
    if unavailable is not None:
        logger.warning("%s %s: %s: %s", request.method, request.path, unavailable.code, exc)
        response = on_domain_error(request, unavailable)
        response["Retry-After"] = str(unavailable.retry_after)
        return response
    logger.exception("unhandled error in %s %s", request.method, request.path)
    return error_response(
        request, status=500, code="internal_error", message="Something went wrong on our side."
    )


# --- routers -----------------------------------------------------------------------------

fallback_router = Router()


@fallback_router.api_operation(
    ["GET", "POST", "PUT", "PATCH", "DELETE"], "/{path:rest}", auth=None, include_in_schema=False
)
def unknown_path(request: HttpRequest, rest: str):
    """Any other path under /api/v1/ is a JSON 404 too (ids are int-typed in the paths,
    so /tasks/abc lands here)."""
    raise NotFound(f"No API endpoint at /{rest}.")


api.add_router("", groups_router, tags=["groups"])
api.add_router("", devices_router, tags=["devices"])
api.add_router("", tasks_router, tags=["tasks"])
api.add_router("", artifact_upload_router, auth=DEVICE_OR_HUMAN_AUTH, tags=["artifacts"])
api.add_router("", artifacts_router, tags=["artifacts"])
api.add_router("", checkpoints_router, tags=["checkpoints"])
api.add_router("", events_router, tags=["events"])
api.add_router("", fallback_router)
