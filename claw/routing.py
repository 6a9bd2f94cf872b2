from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from apps.dashboard.consumers import LivePageConsumer
from apps.devices.consumers import AgentConsumer
from apps.events.consumers import GroupEventsConsumer


def browser(consumer):
    """Browser sockets: session auth, and the Origin must be one of ALLOWED_HOSTS."""
    return AllowedHostsOriginValidator(AuthMiddlewareStack(consumer))


# Device agents authenticate with their bearer token at the handshake; no cookies, no Origin.
websocket_urlpatterns = [
    path("ws/agent/", AgentConsumer.as_asgi()),
    path("ws/groups/<slug:slug>/events/", browser(GroupEventsConsumer.as_asgi())),
    # Dashboard pages: ?page=NAME&group=SLUG[&…] (the contract: apps.dashboard.live).
    path("ws/live/", browser(LivePageConsumer.as_asgi())),
]
