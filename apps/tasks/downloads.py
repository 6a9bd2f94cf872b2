"""How an artifact's file is served, by the API and by the dashboard alike. Uploads are
untrusted: an HTML or SVG file rendered in our origin would run its scripts with the
viewer's session, so nothing is rendered inline but raster images, types a browser runs as
a document are sent as bytes, and a sandbox CSP covers a file opened directly anyway."""

from django.http import FileResponse

from apps.tasks.models import Artifact

INLINE_IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
# Types a browser renders as a document that can run scripts or load other resources.
ACTIVE_TYPES = {
    "text/html",
    "application/xhtml+xml",
    "image/svg+xml",
    "text/xml",
    "application/xml",
    "text/xsl",
    "application/xslt+xml",
    "text/javascript",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "text/ecmascript",
    "multipart/x-mixed-replace",
}
SANDBOX_CSP = "default-src 'none'; sandbox"


def artifact_file_response(artifact: Artifact, *, inline: bool = False) -> FileResponse:
    """The file as an attachment with its stored type (bytes for an active type); inline
    only when asked for and a raster image."""
    stored = artifact.content_type or "application/octet-stream"
    main_type = stored.split(";", 1)[0].strip().lower()
    inline = inline and main_type in INLINE_IMAGE_TYPES
    active = main_type in ACTIVE_TYPES or main_type.endswith(("+xml", "/xml"))
    response = FileResponse(
        artifact.file.open("rb"),
        as_attachment=not inline,
        filename=artifact.name,
        content_type="application/octet-stream" if active else stored,
    )
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = SANDBOX_CSP
    return response
