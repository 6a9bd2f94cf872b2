from django.db import migrations

STANDARD_TOOLKITS = {
    "shell": "Run shell commands.",
    "python": "Run Python code.",
    "browser": "Drive a web browser: open pages, click, read.",
    "vision": "Read and describe images and screenshots.",
    "spreadsheet": "Read and write spreadsheets (CSV, XLSX).",
    "documents": "Write documents (Markdown, DOCX, PDF).",
    "slides": "Build slide decks.",
    "web-search": "Search the web.",
    "llm": "Call the group's language model through the Claw gateway.",
}


def add_toolkits(apps, schema_editor):
    Toolkit = apps.get_model("devices", "Toolkit")
    for slug, description in STANDARD_TOOLKITS.items():
        Toolkit.objects.get_or_create(slug=slug, defaults={"description": description})


class Migration(migrations.Migration):
    dependencies = [("devices", "0001_initial")]
    operations = [migrations.RunPython(add_toolkits, migrations.RunPython.noop)]
