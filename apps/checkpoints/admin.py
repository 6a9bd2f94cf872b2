from django.contrib import admin

from apps.checkpoints.models import Checkpoint, Decision


class DecisionInline(admin.TabularInline):
    model = Decision
    extra = 0
    readonly_fields = ["user", "verdict", "note", "created_at"]
    can_delete = False


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ["id", "title", "group", "source", "status", "required_approvals", "expires_at"]
    list_filter = ["status", "source", "group"]
    search_fields = ["title", "details"]
    raw_id_fields = ["task", "attempt"]
    inlines = [DecisionInline]


@admin.register(Decision)
class DecisionAdmin(admin.ModelAdmin):
    list_display = ["checkpoint", "user", "verdict", "created_at"]
    list_filter = ["verdict"]
