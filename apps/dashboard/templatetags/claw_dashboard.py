"""Template helpers for the dashboard: the navigation's approvals badge, the backend banner
and event lines."""

from django import template
from django.utils.safestring import SafeString

register = template.Library()


@register.simple_tag(takes_context=True)
def approvals_badge(context: template.Context) -> SafeString:
    """The nav's live count (#approvals-badge); the page socket swaps in new counts."""
    from apps.dashboard.views import approvals_badge_html

    user = context.get("user")
    if user is None or not user.is_authenticated:
        return SafeString("")
    return SafeString(approvals_badge_html(user=user, oob=False))


@register.simple_tag(takes_context=True)
def backend_banner(context: template.Context) -> SafeString:
    """`#backend-banner` (apps.dashboard.model_views): while the model backend is down or
    saturated; the page socket swaps in a new one when its status changes."""
    from apps.dashboard.model_views import backend_banner_html

    user = context.get("user")
    if user is None or not user.is_authenticated:
        return SafeString("")
    return SafeString(backend_banner_html(oob=False))


@register.filter
def event_who(event) -> str:
    """Who caused an event: a person, an agent, or the system."""
    if event.actor_id and event.actor is not None:
        return event.actor.get_username()
    if event.agent_id and event.agent is not None:
        return f"agent {event.agent.name}"
    return "system"


@register.filter
def event_text(event) -> str:
    """A short line for an event, from its kind and the payload fields worth showing."""
    payload = event.payload or {}
    detail = ""
    for key in ("title", "name", "username", "status", "verdict", "role", "to", "reason"):
        value = payload.get(key)
        if isinstance(value, str | int) and value != "":
            detail = f"{key} {value}" if key in ("role", "to", "verdict") else str(value)
            break
    return f"{event.kind} · {detail}" if detail else event.kind
