"""Artifact previews for the task page. Every preview reads a bounded prefix of the file
and never trusts it: markdown is rendered and then sanitized (nh3), HTML goes into a
sandboxed iframe without scripts, tables show their first rows only."""

import csv
import io
import logging
from dataclasses import dataclass, field

from django.utils.safestring import SafeString, mark_safe

from apps.tasks.downloads import INLINE_IMAGE_TYPES
from apps.tasks.models import Artifact, ArtifactKind

logger = logging.getLogger(__name__)

MAX_TEXT_BYTES = 256 * 1024  # markdown, HTML, CSV: read at most this much
MAX_XLSX_BYTES = 5 * 1024 * 1024  # larger workbooks get a download link only
MAX_ROWS = 50
MAX_COLUMNS = 30
MAX_CELL = 200
# Raster images only: an SVG can carry scripts.
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


@dataclass
class Preview:
    kind: str  # markdown | html | table | image | download
    html: SafeString | str = ""  # markdown: sanitized HTML
    srcdoc: str = ""  # html: the document, escaped into the iframe's srcdoc by the template
    rows: list[list[str]] = field(default_factory=list)  # table
    truncated: bool = False
    note: str = ""


def preview_kind(artifact: Artifact) -> str:
    name = artifact.name.lower()
    ctype = artifact.content_type.split(";")[0].strip().lower()
    if ctype in ("text/markdown", "text/x-markdown") or name.endswith((".md", ".markdown")):
        return "markdown"
    if ctype == "text/html" or name.endswith((".html", ".htm")):
        return "html"
    if ctype == "text/csv" or name.endswith(".csv"):
        return "csv"
    if ctype == XLSX_TYPE or name.endswith(".xlsx"):
        return "xlsx"
    if ctype in INLINE_IMAGE_TYPES:
        return "image"
    if artifact.kind == ArtifactKind.WEBSITE and ctype.startswith("text/"):
        return "html"
    return "download"


def _read_prefix(artifact: Artifact, limit: int) -> tuple[bytes, bool]:
    with artifact.file.open("rb") as handle:
        data = handle.read(limit + 1)
    return data[:limit], len(data) > limit


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def render_markdown(text: str) -> SafeString:
    """Markdown to HTML, then sanitized: no scripts, no event handlers, no javascript: URLs."""
    import markdown  # here: a web process that never previews does not carry them
    import nh3

    html = markdown.markdown(text, extensions=["tables", "fenced_code", "sane_lists"])
    return mark_safe(nh3.clean(html, link_rel="noopener noreferrer nofollow"))  # noqa: S308


def csv_rows(data: bytes) -> tuple[list[list[str]], bool]:
    text = _text(data)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows: list[list[str]] = []
    for row in csv.reader(io.StringIO(text), dialect):
        if len(rows) == MAX_ROWS:
            return rows, True
        rows.append([_cell(value) for value in row[:MAX_COLUMNS]])
    return rows, False


def xlsx_rows(data: bytes) -> tuple[list[list[str]], bool]:
    from openpyxl import load_workbook

    workbook = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        sheet = workbook.worksheets[0]
        rows = [
            [_cell(value) for value in row]
            for row in sheet.iter_rows(max_row=MAX_ROWS + 1, max_col=MAX_COLUMNS, values_only=True)
        ]
    finally:
        workbook.close()
    truncated = len(rows) > MAX_ROWS
    return rows[:MAX_ROWS], truncated


def artifact_preview(artifact: Artifact) -> Preview:
    """The preview of one artifact, or a download link when it has none or it fails."""
    kind = preview_kind(artifact)
    try:
        if kind == "markdown":
            data, truncated = _read_prefix(artifact, MAX_TEXT_BYTES)
            return Preview("markdown", html=render_markdown(_text(data)), truncated=truncated)
        if kind == "html":
            data, truncated = _read_prefix(artifact, MAX_TEXT_BYTES)
            return Preview("html", srcdoc=_text(data), truncated=truncated)
        if kind == "csv":
            data, cut = _read_prefix(artifact, MAX_TEXT_BYTES)
            rows, more = csv_rows(data)
            return Preview("table", rows=rows, truncated=cut or more)
        if kind == "xlsx":
            if artifact.size > MAX_XLSX_BYTES:
                return Preview("download", note="too large to preview")
            data, _ = _read_prefix(artifact, MAX_XLSX_BYTES)
            rows, more = xlsx_rows(data)
            return Preview("table", rows=rows, truncated=more)
        if kind == "image":
            return Preview("image")
    except Exception:  # a broken or missing file must not break the page
        logger.warning("no preview for artifact %s", artifact.id, exc_info=True)
        return Preview("download", note="preview unavailable")
    return Preview("download")
