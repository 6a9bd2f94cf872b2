"""`python -m claw.web`: plain Daphne without Twisted's TLS (the proxy terminates TLS), run
as deployed on a real server with tests/stream_app: a stream arrives whole and in order when
the socket cannot take it all at once, and a client that leaves mid-stream stops it."""

import io
import socket
import subprocess
import sys
import time

import pytest

from claw.cli import _service_commands
from tests.live import PYTHON, Proc, child_env, free_port, wait_listening
from tests.stream_app import piece

PROBE = """
import sys
{prelude}
import daphne.server, twisted.internet.endpoints
print(sys.modules.get("OpenSSL") is not None)
"""


def loads_openssl(prelude: str) -> bool:
    code = PROBE.format(prelude=prelude)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return run.stdout.strip() == "True"


def test_the_web_process_does_without_pyopenssl():
    assert loads_openssl("")  # what plain `daphne` loads, for Claw's nothing
    assert not loads_openssl("import claw.web; claw.web.without_tls()")


HANDOVER = """
from daphne import cli, server
from twisted.internet import tcp
import claw.web

def entrypoint():
    print(cli.CommandLineInterface.server_class is server.Server, tcp.Port.transport is tcp.Server)

cli.CommandLineInterface.entrypoint = entrypoint
claw.web.main()
"""


def test_the_launcher_hands_over_to_daphne_as_installed():
    """No patched copies of Daphne's or Twisted's internals: an upgrade of either cannot
    silently break what Claw changed in it, because Claw changes nothing in it."""
    run = subprocess.run([sys.executable, "-c", HANDOVER], capture_output=True, text=True)
    assert run.stdout.split() == ["True", "True"], run.stdout + run.stderr


def test_claw_up_runs_its_web_process_through_the_launcher():
    web = _service_commands(host="127.0.0.1", port=8000, concurrency=1)["web"]
    assert web[1:3] == ["-m", "claw.web"] and web[-1] == "claw.asgi:application"


@pytest.fixture(scope="module")
def web_port():
    port = free_port()
    command = [PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port)]
    proc = Proc("web", [*command, "tests.stream_app:application"], child_env())
    wait_listening(port, 30, proc)
    yield port
    proc.close()


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    return sock


def get(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: claw\r\n\r\n".encode())


def read_head(reader) -> dict:
    assert reader.readline().startswith(b"HTTP/1.1 200")
    headers = {}
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def read_chunks(reader):
    while size := int(reader.readline(), 16):
        chunk = reader.read(size + 2)
        assert chunk.endswith(b"\r\n")
        yield chunk[:-2]
    assert reader.readline() == b"\r\n"


def streams_seen_gone(port: int) -> int:
    with connect(port) as sock:
        get(sock, "/gone")
        reader = sock.makefile("rb")
        headers = read_head(reader)
        return int(reader.read(int(headers["content-length"])))


@pytest.mark.slow
def test_a_stream_bigger_than_the_socket_takes_arrives_whole_and_in_order(web_port):
    """The client reads slower than the application writes: pieces queue behind what the
    socket did not take while the socket drains, and must not overtake it."""
    pieces, size = 300, 32 * 1024  # ~10 MB, written over ~0.6 s
    with connect(web_port, receive_buffer=4096) as sock:
        get(sock, f"/stream?pieces={pieces}&size={size}&delay=0.002")
        time.sleep(0.2)
        raw = bytearray()
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, "the server closed the connection mid-stream"
            raw += data
            time.sleep(0.003)
        reader = io.BytesIO(raw)
        assert read_head(reader)["transfer-encoding"] == "chunked"
        received = list(read_chunks(reader))
        assert len(received) == pieces
        for index, chunk in enumerate(received):
            assert chunk == piece(index, size), f"piece {index} differs"

        get(sock, "/stream?pieces=3&size=100")  # the connection is still good
        reader = sock.makefile("rb")
        read_head(reader)
        assert list(read_chunks(reader)) == [piece(i, 100) for i in range(3)]


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_stops_it_and_the_server_serves_on(web_port):
    before = streams_seen_gone(web_port)
    with connect(web_port) as sock:
        get(sock, "/stream?pieces=1000000&size=1024&delay=0.0005")
        sock.recv(4096)
    deadline = time.monotonic() + 10
    while streams_seen_gone(web_port) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert streams_seen_gone(web_port) == before + 1
