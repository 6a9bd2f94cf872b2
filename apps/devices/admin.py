from django.contrib import admin

from apps.devices.models import Agent, Device, PairingCode, Toolkit, ToolkitSkill


@admin.register(Toolkit)
class ToolkitAdmin(admin.ModelAdmin):
    list_display = ["slug", "description", "created_at"]
    search_fields = ["slug", "description"]


@admin.register(ToolkitSkill)
class ToolkitSkillAdmin(admin.ModelAdmin):
    """Read-only: versions are written by apps.devices.skills (events, numbering)."""

    list_display = ["toolkit", "group", "version", "source", "status", "created_by", "created_at"]
    list_filter = ["status", "source", "group"]
    search_fields = ["toolkit__slug", "document_name"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "group",
        "kind",
        "platform",
        "paired_at",
        "last_seen_at",
        "draining",
        "revoked_at",
    ]
    list_filter = ["kind", "draining", "group"]
    search_fields = ["name", "platform"]
    readonly_fields = ["token_hash", "token_prefix", "paired_at", "last_seen_at"]


@admin.register(PairingCode)
class PairingCodeAdmin(admin.ModelAdmin):
    list_display = ["group", "created_by", "created_at", "expires_at", "used_at", "device"]
    readonly_fields = ["code_hash"]


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "device",
        "group",
        "status",
        "capacity",
        "last_heartbeat_at",
        "succeeded_count",
        "failed_count",
    ]
    list_filter = ["status", "group"]
    search_fields = ["name", "device__name"]
