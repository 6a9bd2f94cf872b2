"""Artifact previews for the task page. Every preview reads a bounded prefix of the file
and never trusts it: markdown is rendered and then sanitized (nh3), HTML goes into a
sandboxed iframe without scripts, tables show their first rows only. A workbook is a zip:
its parts' unpacked sizes are checked before openpyxl opens it. A built preview is cached
by artifact and checksum, so a page view does not parse the file again."""

import csv
import io
import logging
import zipfile
from dataclasses import dataclass, field

from django.core.cache import cache
from django.utils.safestring import SafeString, mark_safe

from apps.tasks.downloads import INLINE_IMAGE_TYPES
from apps.tasks.models import Artifact, ArtifactKind

logger = logging.getLogger(__name__)

MAX_TEXT_BYTES = 256 * 1024  # markdown, HTML, CSV: read at most this much
MAX_XLSX_BYTES = 5 * 1024 * 1024  # larger workbooks get a download link only
# openpyxl reads the whole shared-strings table and the styles, even read-only, at some
# 40,000 strings a second: a 327 KB file unpacking 2M strings (~110 MB) took 45 s.
MAX_XLSX_UNPACKED = 8 * 1024 * 1024  # all parts together, as the zip declares them
MAX_XLSX_PART = {"xl/sharedStrings.xml": 1024 * 1024, "xl/styles.xml": 1024 * 1024}
PREVIEW_CACHE_S = 24 * 3600
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


class TooLarge(Exception):
    pass


def check_xlsx_size(data: bytes) -> None:
    """Raise TooLarge when the workbook unpacks to more than the limits. The sizes come
    from the zip's central directory; zipfile never yields more than a part declares, so
    they bound what openpyxl can read."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        parts = archive.infolist()
    if sum(part.file_size for part in parts) > MAX_XLSX_UNPACKED:
        raise TooLarge
    for part in parts:
        if part.file_size > MAX_XLSX_PART.get(part.filename, MAX_XLSX_UNPACKED):
            raise TooLarge


def xlsx_rows(data: bytes) -> tuple[list[list[str]], bool]:
    from openpyxl import load_workbook

    check_xlsx_size(data)
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
    """The preview of one artifact, or a download link when it has none or it fails; built
    once per artifact version (its checksum), then served from the cache."""
    key = f"claw:preview:{artifact.id}:{artifact.sha256}"
    preview = cache.get(key)
    if preview is None:
        preview = build_preview(artifact)
        cache.set(key, preview, timeout=PREVIEW_CACHE_S)
    return preview


def build_preview(artifact: Artifact) -> Preview:
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
                return Preview("download", note="too large")
            data, _ = _read_prefix(artifact, MAX_XLSX_BYTES)
            rows, more = xlsx_rows(data)
            return Preview("table", rows=rows, truncated=more)
        if kind == "image":
            return Preview("image")
    except TooLarge:
        return Preview("download", note="too large")
    except Exception:  # a broken or missing file must not break the page
        logger.warning("no preview for artifact %s", artifact.id, exc_info=True)
        return Preview("download", note="the file could not be read")
    return Preview("download")
