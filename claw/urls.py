from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, register_converter

from claw.api import api
from claw.health import healthz
from claw.metrics import metrics_view
from claw.schema import IdConverter
from claw.views import AdminSignInForm, SignInView, home

register_converter(IdConverter, "id")
admin.site.login_form = AdminSignInForm

urlpatterns = [
    path("", home, name="home"),
    path("login/", SignInView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("", include("apps.dashboard.urls")),
]
