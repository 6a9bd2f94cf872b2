"""This web process as the failover sweeper sees it: a ServerProcess row, seen every second.

A web process killed with -9 (or whose machine is lost) never runs its sockets'
disconnect handlers, so without this its agents would stay online until their leases ran
out. Agents' connections name the process they are on; the sweeper treats the agents of a
process that stopped being seen as disconnected since its last sign of life
(apps.tasks.failover), and the group's reconnect grace applies as for a closed socket.

The process registers on its first agent's hello (whatever ASGI server runs it) and a
daemon thread heartbeats from then on. Test settings turn this off (SERVER_HEARTBEAT):
in-process tests have no server process, and a thread writing to the test database would
outlive the test.
"""

import logging
import os
import socket
import threading
import uuid

from django.conf import settings
from django.db import close_old_connections, connection

from apps.devices.services import server_process_heartbeat, server_process_register

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0

_lock = threading.Lock()
_current: tuple[int, int] | None = None  # (pid, ServerProcess id)


def process_name() -> str:
    """host:pid:token, unique across restarts (a pid can be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def current_server_id() -> int | None:
    """This process's ServerProcess id, registering it and starting its heartbeat on the
    first call (in a forked child, again). None when SERVER_HEARTBEAT is off."""
    global _current
    if not settings.SERVER_HEARTBEAT:
        return None
    pid = os.getpid()
    if _current is not None and _current[0] == pid:
        return _current[1]
    with _lock:
        if _current is None or _current[0] != pid:
            server = server_process_register(name=process_name())
            _current = (pid, server.id)
            threading.Thread(
                target=_heartbeat, args=(pid,), name="claw-server-heartbeat", daemon=True
            ).start()
            logger.info("web process registered as %s", server.name)
        return _current[1]


def _heartbeat(pid: int) -> None:
    global _current
    stopped = threading.Event()
    while not stopped.wait(HEARTBEAT_S):
        if _current is None or _current[0] != pid:
            return
        try:
            close_old_connections()
            if not server_process_heartbeat(server_id=_current[1]):
                _current = (pid, server_process_register(name=process_name()).id)
        except Exception:
            logger.warning("the web process heartbeat failed", exc_info=True)
            connection.close()
