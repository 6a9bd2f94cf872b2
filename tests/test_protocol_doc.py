from pathlib import Path

from claw import protocol

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_the_protocol_doc_carries_the_current_schemas():
    text = DOC.read_text()
    assert text == protocol.doc_with_schemas(text), (
        "docs/protocol.md is out of date: run python -m claw.protocol --write-doc docs/protocol.md"
    )


def test_the_doc_names_every_frame_type_and_close_code():
    text = DOC.read_text()
    for frame_type in (
        "hello",
        "heartbeat",
        "accept",
        "decline",
        "progress",
        "complete",
        "fail",
        "checkpoint_request",
        "decision_received",
        "drain",
        "welcome",
        "ack",
        "error",
        "assignment",
        "decision",
        "cancel",
    ):
        assert f"`{frame_type}`" in text, frame_type
    for name in dir(protocol):
        if name.startswith("CLOSE_"):
            assert f"| {getattr(protocol, name)} |" in text, name


def test_the_protocol_module_does_not_import_django():
    source = (DOC.parent.parent / "claw" / "protocol.py").read_text()
    assert "import django" not in source and "from django" not in source
