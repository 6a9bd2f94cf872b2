from django.contrib import admin

from apps.events.models import Event, ProcessBeat


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    """Read-only: the event log is append-only."""

    list_display = ["group", "seq", "kind", "task", "agent", "actor", "created_at"]
    list_filter = ["kind", "group"]
    search_fields = ["kind"]
    raw_id_fields = ["task", "attempt", "agent"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ProcessBeat)
class ProcessBeatAdmin(admin.ModelAdmin):
    list_display = ["name", "last_seen_at"]
