from django.contrib import admin

from apps.llm.models import Backend, BackendProbe, ModelCall


@admin.register(ModelCall)
class ModelCallAdmin(admin.ModelAdmin):
    list_display = ("id", "group", "model", "status", "prompt_tokens", "completion_tokens")
    list_filter = ("status", "model")
    raw_id_fields = ("group", "device", "agent", "task", "attempt")


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin):
    list_display = ("base_url", "status", "status_since", "probed_at")


@admin.register(BackendProbe)
class BackendProbeAdmin(admin.ModelAdmin):
    list_display = ("at", "backend", "status", "latency_ms", "running", "queued", "kv_usage")
    list_filter = ("status",)
    raw_id_fields = ("backend",)
