from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The web dashboard: server-rendered pages, htmx, and one live socket per page."""

    name = "apps.dashboard"
    label = "dashboard"

    def ready(self) -> None:
        # Pages register their live renderers at import time (see apps.dashboard.live).
        import apps.dashboard.model_views
        import apps.dashboard.skill_views
        import apps.dashboard.task_views
        import apps.dashboard.views  # noqa: F401
