"""What every dashboard view shares: sign-in, domain errors as HTTP answers, running a
service call from a form post, and going back where the form came from."""

from collections.abc import Callable
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils.http import url_has_allowed_host_and_scheme

from claw.errors import DomainError, Forbidden, NotFound


def dashboard_view(view: Callable) -> Callable:
    """Signed-in only; outsiders get a 404 and members below the needed role a 403,
    whatever raised it."""

    @login_required
    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except NotFound as error:
            raise Http404(error.message) from None
        except Forbidden as error:
            raise PermissionDenied(error.message) from None

    return wrapped


REFUSED = object()


def perform(request: HttpRequest, action: Callable[[], object], *, prefix: str = "") -> object:
    """Run a service call for a form post and return its result. A refusal (a domain error
    other than not-found or forbidden, which dashboard_view answers) becomes an error
    message, and REFUSED is returned."""
    try:
        return action()
    except (NotFound, Forbidden):
        raise
    except DomainError as error:
        messages.error(request, f"{prefix}{error.message}")
        return REFUSED


def back(request: HttpRequest, default: str) -> HttpResponse:
    """Redirect to the form's `next` when it is on this site, else to `default`."""
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = default
    return redirect(target)
