from django.urls import path

from apps.events.consumers import GroupEventsConsumer

browser_websocket_urlpatterns = [
    path("ws/groups/<slug:slug>/events/", GroupEventsConsumer.as_asgi()),
]
