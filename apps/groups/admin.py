from django.contrib import admin

from apps.groups.models import ApiToken, Group, Membership


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Group)
class GroupAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "heartbeat_interval_s", "lease_timeout_s", "max_attempts"]
    search_fields = ["name", "slug"]
    readonly_fields = ["event_seq", "created_at"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "group", "role", "created_at"]
    list_filter = ["role", "group"]
    search_fields = ["user__username", "group__slug"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["token_hash", "prefix", "created_at", "last_used_at"]
    search_fields = ["name", "user__username"]
