"""Mounted at /v1/: the OpenAI-compatible model gateway (base_url = <server>/v1)."""

from django.urls import path

from apps.llm import views

app_name = "llm"

urlpatterns = [
    path("models", views.models, name="models"),
    path("chat/completions", views.chat_completions, name="chat_completions"),
]
