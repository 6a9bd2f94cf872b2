"""URLs of the Model page (included by apps.dashboard.urls, namespace "dashboard")."""

from django.urls import path

from apps.dashboard import model_views

urlpatterns = [
    path("g/<slug:slug>/model/", model_views.model, name="model"),
    path("g/<slug:slug>/model/budget/", model_views.model_budget, name="model_budget"),
]
