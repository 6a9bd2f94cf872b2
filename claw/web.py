"""`python -m claw.web [daphne options] claw.asgi:application`: Daphne, as Claw runs it.

Claw's web processes speak plain HTTP and WebSocket behind a proxy that terminates TLS.
Daphne depends on `twisted[tls]`, so pyOpenSSL and service_identity are installed, and
Twisted's endpoints module loads them at start for TLS endpoints that Claw never opens:
about 5 MB of every web process's memory, which holds thousands of agent sockets. Here
OpenSSL is marked unavailable before Daphne starts, which takes Twisted's own no-TLS path.
To terminate TLS in Daphne itself, run plain `daphne` instead; nothing else differs.
"""

import sys


def without_tls() -> None:
    """Keep Twisted from loading pyOpenSSL in this process (a no-op once it is loaded)."""
    sys.modules.setdefault("OpenSSL", None)


def main() -> None:
    without_tls()
    from daphne.cli import CommandLineInterface

    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
