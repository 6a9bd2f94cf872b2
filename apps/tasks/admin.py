from django.contrib import admin

from apps.tasks.models import Artifact, Attempt, Task, TaskDependency


class DependencyInline(admin.TabularInline):
    model = TaskDependency
    fk_name = "task"
    extra = 0
    raw_id_fields = ["depends_on"]


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    fields = [
        "epoch",
        "agent",
        "device",
        "status",
        "lease_expires_at",
        "started_at",
        "ended_at",
        "failure_reason",
    ]
    readonly_fields = fields
    can_delete = False


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["id", "title", "group", "status", "priority", "epoch", "created_at"]
    list_filter = ["status", "group"]
    search_fields = ["title", "instructions"]
    raw_id_fields = ["parent", "root", "created_by_agent"]
    readonly_fields = ["epoch", "attempt_floor", "created_at", "updated_at"]
    inlines = [DependencyInline, AttemptInline]


@admin.register(Attempt)
class AttemptAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "task",
        "epoch",
        "agent",
        "device",
        "status",
        "lease_expires_at",
        "ended_at",
    ]
    list_filter = ["status"]
    raw_id_fields = ["task", "agent", "device"]


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "task", "kind", "size", "created_at"]
    list_filter = ["kind"]
    search_fields = ["name"]
    raw_id_fields = ["task", "attempt", "created_by_agent"]
