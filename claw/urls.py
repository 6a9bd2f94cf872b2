from django.contrib import admin
from django.urls import path

from claw.api import api
from claw.health import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
]
