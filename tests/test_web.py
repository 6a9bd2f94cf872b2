"""`python -m claw.web`: Daphne without Twisted's TLS (the proxy terminates TLS), and with
a leaner queue per connection (InputQueue, which must behave like the asyncio.Queue it
replaces)."""

import asyncio
import subprocess
import sys

import pytest

from claw.cli import _service_commands
from claw.web import InputQueue

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


def test_claw_up_runs_its_web_process_through_the_launcher():
    web = _service_commands(host="127.0.0.1", port=8000, concurrency=1)["web"]
    assert web[1:3] == ["-m", "claw.web"] and web[-1] == "claw.asgi:application"


async def test_the_input_queue_is_fifo_and_get_waits_for_a_put():
    queue = InputQueue()
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert [await queue.get(), await queue.get()] == [1, 2]
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.put_nowait(3)
    assert await asyncio.wait_for(getter, 1) == 3
    assert queue.empty() and bool(queue)  # Daphne tests `if self.application_queue:`


async def test_a_cancelled_get_passes_its_wake_up_to_the_next_getter():
    queue = InputQueue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("item")  # wakes the first getter...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1) == "item"
