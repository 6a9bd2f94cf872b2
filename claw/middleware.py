"""Django middleware of our own."""

import logging

from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

from claw.errors import database_unavailable

logger = logging.getLogger(__name__)


class DatabaseUnavailableMiddleware:
    """A page whose database cannot be reached answers a plain 503 (with Retry-After)
    instead of a 500: the outage is not a bug, and a proxy or a person can retry. The page
    is rendered without the request's context, which would ask the database again for the
    signed-in user. The API answers its own JSON 503 (claw.api)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        unavailable = database_unavailable(exc)
        if unavailable is None:
            return None
        logger.warning("%s %s: %s: %s", request.method, request.path, unavailable.code, exc)
        response = HttpResponse(
            render_to_string("503.html", {"message": unavailable.message}), status=503
        )
        response["Retry-After"] = str(unavailable.retry_after)
        return response
