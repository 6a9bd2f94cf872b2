"""`python -m claw.web`: Daphne without Twisted's TLS (the proxy terminates TLS)."""

import subprocess
import sys

from claw.cli import _service_commands

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
