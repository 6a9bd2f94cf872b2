from django.contrib import admin

from apps.llm.models import ModelCall


@admin.register(ModelCall)
class ModelCallAdmin(admin.ModelAdmin):
    list_display = ("id", "group", "model", "status", "prompt_tokens", "completion_tokens")
    list_filter = ("status", "model")
    raw_id_fields = ("group", "device", "agent", "task", "attempt")
