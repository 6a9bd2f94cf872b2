from apps.dashboard.task_urls import urlpatterns as task_urlpatterns

app_name = "dashboard"

urlpatterns: list = [*task_urlpatterns]
