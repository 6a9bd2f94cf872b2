"""URLs of the task pages (included by apps.dashboard.urls, namespace "dashboard")."""

from django.urls import path

from apps.dashboard import plan_views, task_views

urlpatterns = [
    path("g/<slug:slug>/tasks/", task_views.task_board, name="task_board"),
    path("g/<slug:slug>/tasks/new/", task_views.task_create_view, name="task_create"),
    path("g/<slug:slug>/tasks/<id:task_id>/", task_views.task_detail, name="task_detail"),
    path(
        "g/<slug:slug>/tasks/<id:task_id>/cancel/",
        task_views.task_cancel_view,
        name="task_cancel",
    ),
    path("g/<slug:slug>/tasks/<id:task_id>/retry/", task_views.task_retry_view, name="task_retry"),
    path("g/<slug:slug>/tasks/<id:task_id>/plan/", task_views.task_plan_view, name="task_plan"),
    path(
        "g/<slug:slug>/checkpoints/<id:checkpoint_id>/plan/",
        plan_views.checkpoint_plan,
        name="checkpoint_plan",
    ),
    path(
        "g/<slug:slug>/tasks/<id:task_id>/artifacts/<id:artifact_id>/",
        task_views.artifact_download,
        name="task_artifact",
    ),
]
