from django.urls import path

from apps.dashboard import skill_views, views
from apps.dashboard.model_urls import urlpatterns as model_urlpatterns
from apps.dashboard.task_urls import urlpatterns as task_urlpatterns

app_name = "dashboard"

urlpatterns: list = [
    path("groups/", views.groups, name="groups"),
    path("g/<slug:slug>/", views.overview, name="overview"),
    path("g/<slug:slug>/members/", views.members, name="members"),
    path("g/<slug:slug>/members/<id:user_id>/role/", views.member_role, name="member_role"),
    path("g/<slug:slug>/members/<id:user_id>/remove/", views.member_remove, name="member_remove"),
    path("g/<slug:slug>/leave/", views.group_leave, name="group_leave"),
    path("g/<slug:slug>/invites/", views.invite_create_view, name="invite_create"),
    path(
        "g/<slug:slug>/invites/<id:invite_id>/revoke/",
        views.invite_revoke_view,
        name="invite_revoke",
    ),
    path("invite/<str:token>/", views.invite_accept_view, name="invite_accept"),
    path("me/tokens/", views.tokens, name="tokens"),
    path("me/tokens/<id:token_id>/revoke/", views.token_revoke, name="token_revoke"),
    path("g/<slug:slug>/agents/", views.agents, name="agents"),
    path(
        "g/<slug:slug>/pairing-codes/", views.pairing_code_create_view, name="pairing_code_create"
    ),
    path(
        "g/<slug:slug>/devices/<id:device_id>/revoke/",
        views.device_revoke_view,
        name="device_revoke",
    ),
    path(
        "g/<slug:slug>/devices/<id:device_id>/drain/", views.device_drain_view, name="device_drain"
    ),
    path("g/<slug:slug>/agents/<id:agent_id>/drain/", views.agent_drain_view, name="agent_drain"),
    path("g/<slug:slug>/toolkits/", skill_views.toolkits, name="toolkits"),
    path(
        "g/<slug:slug>/toolkits/<slug:toolkit>/documents/",
        skill_views.skill_upload_view,
        name="skill_upload",
    ),
    path(
        "g/<slug:slug>/toolkits/<slug:toolkit>/skill/",
        skill_views.skill_edit_view,
        name="skill_edit",
    ),
    path("approvals/", views.approvals, name="approvals"),
    path(
        "checkpoints/<id:checkpoint_id>/decide/",
        views.checkpoint_decide_view,
        name="checkpoint_decide",
    ),
    *task_urlpatterns,
    *model_urlpatterns,
]
