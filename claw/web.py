"""`python -m claw.web [daphne options] claw.asgi:application`: Daphne, as Claw runs it.

Claw's web processes speak plain HTTP and WebSocket behind a proxy that terminates TLS.
Daphne depends on `twisted[tls]`, so pyOpenSSL and service_identity are installed, and
Twisted's endpoints module loads them at start for TLS endpoints that Claw never opens:
about 5 MB of every web process's memory, which holds thousands of agent sockets. Here
OpenSSL is marked unavailable before Daphne starts, so Twisted takes the path it takes
when its optional `tls` extra is not installed. To terminate TLS in Daphne itself, run
plain `daphne` instead: the same server.

Nothing else differs from `daphne` but one thing: a request body over Claw's limits is
refused with 413 as it arrives (claw.bodylimit), which needs Daphne's request class, as
Daphne reads a whole body before the application sees it. That is the one place Claw
reaches into another project's internals; it is pinned to the Daphne release it was
written for (pyproject.toml, and tests/test_body_limit.py fails on any other). The server,
its per-connection queues and Twisted's transports are the installed versions' own,
started through Daphne's command line.
"""

import sys


def without_tls() -> None:
    """Keep Twisted from loading pyOpenSSL in this process (a no-op once it is loaded).

    Python's documented way to make a module unimportable (`sys.modules[name] = None`);
    Twisted supports running without pyOpenSSL and only loses TLS endpoints."""
    sys.modules.setdefault("OpenSSL", None)


def main() -> None:
    from claw.bodylimit import daphne_refuses_large_bodies

    without_tls()
    daphne_refuses_large_bodies()
    from daphne.cli import CommandLineInterface  # the `daphne` script's own entry point

    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
