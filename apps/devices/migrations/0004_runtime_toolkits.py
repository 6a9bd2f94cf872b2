from django.db import migrations

RUNTIME_TOOLKITS = {
    "files": "Read, write and list files inside the agent's work directory.",
    "http": "Fetch URLs over HTTP(S).",
}


def add_toolkits(apps, schema_editor):
    Toolkit = apps.get_model("devices", "Toolkit")
    for slug, description in RUNTIME_TOOLKITS.items():
        Toolkit.objects.get_or_create(slug=slug, defaults={"description": description})


class Migration(migrations.Migration):
    dependencies = [("devices", "0003_agent_connection_and_messages")]
    operations = [migrations.RunPython(add_toolkits, migrations.RunPython.noop)]
