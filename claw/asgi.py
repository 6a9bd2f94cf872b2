import asyncio
import importlib
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "claw.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from claw.bodylimit import limit_body  # noqa: E402
from claw.routing import websocket_urlpatterns  # noqa: E402

_gateway = None
django_limited = limit_body(django_asgi_app)


async def http(scope: dict, receive, send) -> None:
    """/v1/ is the model gateway (apps.llm.gateway, plain ASGI, which bounds its own bodies);
    the rest is Django, behind the body limit (claw.bodylimit). The gateway, and the openai
    SDK under it (~25 MB), load on its first request, off the event loop: a server whose
    agents never call a model does not carry them."""
    global _gateway
    if scope["path"].startswith("/v1/"):
        if _gateway is None:
            module = await asyncio.to_thread(importlib.import_module, "apps.llm.gateway")
            _gateway = module.application
        await _gateway(scope, receive, send)
    else:
        await django_limited(scope, receive, send)


application = ProtocolTypeRouter({"http": http, "websocket": URLRouter(websocket_urlpatterns)})
