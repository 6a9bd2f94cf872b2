"""The `claw` command line.

    claw up [--host H] [--port P] [--demo]   start the platform in the configured mode
    claw model plan --gpu h200 --gpus-per-node 8 [--nodes N]   size self-hosted K2.6

Embedded mode (no CLAW_REDIS_URL): one process, Daphne in the main thread with a Celery
worker and beat as threads (claw.embedded). Services mode: `claw up` supervises daphne,
`celery worker` and `celery beat` as child processes and stops all of them when one dies.

Subcommands register themselves in build_parser(); each takes its parsed arguments and
returns an exit status. Django is set up per command, so commands that run on a device
(`claw agent`, `claw device`) need no server settings.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from claw.protocol import MAX_FRAME_BYTES

SHUTDOWN_GRACE_S = 15.0


def _setup_django() -> None:
    # Always the server settings: an inherited DJANGO_SETTINGS_MODULE (a test run's,
    # say) would silently change which database and broker `claw up` uses.
    os.environ["DJANGO_SETTINGS_MODULE"] = "claw.settings"
    import django

    django.setup()


def _migrate_if_needed() -> None:
    from django.core.management import call_command
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if plan:
        print(f"claw: applying {len(plan)} database migrations", flush=True)
        call_command("migrate", interactive=False, verbosity=0)


def _browser_host(host: str) -> str:
    if host in {"0.0.0.0", "::", ""}:  # noqa: S104 - naming the wildcard, not binding it
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _banner(*, mode: str, url: str, demo) -> str:
    lines = ["", f"Claw is running ({mode} mode)", f"  Open:     {url}"]
    if demo is not None:
        lines += [
            f"  Username: {demo.username}",
            f"  Password: {demo.password}",
            f"  Group:    {demo.group.name}",
        ]
    lines += ["Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


# How long Daphne lets a closed socket's consumer finish before it kills it (default 10 s).
# When thousands of agents drop at once, their disconnect handlers queue for the database
# (each records the agent as suspect) and the channel layer's shared receiver waits out its
# blocking pop: killed, the agent stays "online" until the silence sweeper notices.
APPLICATION_CLOSE_TIMEOUT_S = 60


def _serve_embedded(*, host: str, port: int, banner: str, on_ready=None, before_stop=None) -> int:
    import asyncio

    from claw.bodylimit import daphne_refuses_large_bodies
    from claw.web import without_tls

    without_tls()  # before Daphne's server loads Twisted's endpoints
    daphne_refuses_large_bodies()
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server
    from twisted.internet import reactor, task, threads

    from claw.asgi import application
    from claw.embedded import EmbeddedCelery, set_home_loop

    celery = EmbeddedCelery()
    crashed: list[str] = []

    def watch_celery() -> None:
        # Like services mode, where the supervisor exits when a child dies.
        if not celery.alive():
            crashed.append("the embedded Celery worker or beat stopped")
            reactor.stop()

    def ready() -> None:
        # Server.run has made the reactor's asyncio loop current; it is about to run it.
        set_home_loop(asyncio.get_event_loop())
        task.LoopingCall(watch_celery).start(2.0, now=False)
        print(banner, flush=True)
        if on_ready is not None:
            on_ready()
        if before_stop is not None:
            # While the server still listens, so what it stops can say goodbye to it.
            reactor.addSystemEventTrigger(
                "before", "shutdown", lambda: threads.deferToThread(before_stop)
            )

    server = Server(
        application=application,
        endpoints=build_endpoint_description_strings(host=host, port=port),
        signal_handlers=True,  # SIGINT/SIGTERM stop the reactor; run() then returns
        websocket_max_message_size=MAX_FRAME_BYTES,
        application_close_timeout=APPLICATION_CLOSE_TIMEOUT_S,
        ready_callable=ready,
    )
    try:
        celery.start()
        server.run()
    finally:
        set_home_loop(None)
        print("claw: stopping the embedded worker and beat", flush=True)
        celery.stop()
    if crashed:
        print(f"claw: {crashed[0]}; stopping", file=sys.stderr)
        return 1
    if not server.listening_addresses:
        print(f"claw: could not listen on {host}:{port}", file=sys.stderr)
        return 1
    return 0


def _service_commands(*, host: str, port: int, concurrency: int) -> dict[str, list[str]]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "claw"]
    daphne_limits = ["--websocket-max-message-size", str(MAX_FRAME_BYTES)]
    daphne_limits += ["--application-close-timeout", str(APPLICATION_CLOSE_TIMEOUT_S)]
    asgi = "claw.asgi:application"
    return {
        "web": [python, "-m", "claw.web", "-b", host, "-p", str(port), *daphne_limits, asgi],
        "worker": [*celery, "worker", "--loglevel", "INFO", "--concurrency", str(concurrency)],
        "beat": [*celery, "beat", "--loglevel", "INFO"],
    }


def _fresh_metrics_dir(data_dir: Path) -> str:
    """The children's shared metrics directory (claw.metrics), emptied now, as none of
    them runs yet: one scrape of any web process then adds up all of this run's counters."""
    from claw.metrics import metrics_dir_reset

    path = os.environ.get("CLAW_METRICS_DIR") or str(data_dir / "metrics")
    metrics_dir_reset(path)
    return path


def _supervise(
    commands: dict[str, list[str]], *, banner: str, on_ready=None, before_stop=None
) -> int:
    """Run the children until a signal arrives or one of them exits; then stop them all."""
    stop_signal: list[int] = []

    def on_signal(signum, frame) -> None:
        stop_signal.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "claw.settings"}
    children: dict[str, subprocess.Popen] = {}
    status = 0
    try:
        for name, command in commands.items():
            children[name] = subprocess.Popen(command, env=env)  # noqa: S603
        print(banner, flush=True)
        if on_ready is not None:
            on_ready()
        while not stop_signal:
            dead = [(name, p.returncode) for name, p in children.items() if p.poll() is not None]
            if dead:
                name, code = dead[0]
                print(f"claw: {name} exited with status {code}; stopping", file=sys.stderr)
                status = 1
                break
            time.sleep(0.2)
    finally:
        if before_stop is not None:
            before_stop()
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for name, child in children.items():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"claw: {name} did not stop in time; killing it", file=sys.stderr)
                child.kill()
                child.wait()
    return status


def cmd_up(args: argparse.Namespace) -> int:
    from django.core.exceptions import ImproperlyConfigured

    try:
        _setup_django()
    except ImproperlyConfigured as exc:
        print(f"claw: configuration error: {exc}", file=sys.stderr)
        return 2
    from django.conf import settings
    from django.db import OperationalError

    if args.demo and settings.PRODUCTION:
        print(
            "claw: --demo prints a password; it is refused when CLAW_PRODUCTION=1", file=sys.stderr
        )
        return 2
    Path(settings.DATA_DIR).mkdir(parents=True, exist_ok=True)
    url = f"http://{_browser_host(args.host)}:{args.port}/"
    try:
        _migrate_if_needed()
        demo = agents = None
        if args.demo:
            from claw.demo import DemoAgents, demo_ensure

            demo = demo_ensure(server_url=url)
            agents = DemoAgents(demo, server_url=url)
    except OperationalError as exc:
        print(f"claw: the database is not reachable: {exc}", file=sys.stderr)
        return 1
    on_ready = agents.start if agents else None
    before_stop = agents.stop if agents else None
    try:
        if settings.EMBEDDED:
            banner = _banner(mode="embedded", url=url, demo=demo)
            return _serve_embedded(
                host=args.host,
                port=args.port,
                banner=banner,
                on_ready=on_ready,
                before_stop=before_stop,
            )
        banner = _banner(mode="services", url=url, demo=demo)
        commands = _service_commands(host=args.host, port=args.port, concurrency=args.concurrency)
        os.environ["CLAW_METRICS_DIR"] = _fresh_metrics_dir(Path(settings.DATA_DIR))
        return _supervise(commands, banner=banner, on_ready=on_ready, before_stop=before_stop)
    finally:
        if agents is not None:
            agents.stop()


def cmd_model_plan(args: argparse.Namespace) -> int:
    from claw.serving import plan, render

    try:
        result = plan(
            gpu=args.gpu,
            gpus_per_node=args.gpus_per_node,
            nodes=args.nodes,
            context=args.context,
            model=args.model,
            kv_cache_dtype=args.kv_cache_dtype,
            dp_attention=args.dp_attention,
            deepep=args.deepep,
            dist_init_addr=args.dist_init_addr,
        )
    except ValueError as exc:
        print(f"claw: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    if not result.fits:
        print(f"claw: {result.model.name} does not fit on these GPUs", file=sys.stderr)
        return 1
    return 0


def add_model_commands(commands) -> None:
    from claw.serving import DIST_INIT_PLACEHOLDER, GPUS, KV_BYTES, MODELS

    model = commands.add_parser(
        "model", help="plan serving Kimi K2.6 on your own GPUs", description="Model serving."
    )
    model_commands = model.add_subparsers(dest="model_command", metavar="COMMAND")
    model_commands.required = True
    plan = model_commands.add_parser(
        "plan",
        help="check that the weights and KV cache fit; print SGLang's command per node",
        description="Size the model on NODES x GPUS-PER-NODE GPUs (tensor and expert "
        "parallel across all of them) and print the SGLang launch command for each node. "
        "Exits 1 when it does not fit. See docs/serving.md.",
    )
    plan.add_argument("--gpu", required=True, choices=sorted(GPUS))
    plan.add_argument("--gpus-per-node", type=int, required=True, metavar="N")
    plan.add_argument("--nodes", type=int, default=1, metavar="M", help="default 1")
    plan.add_argument(
        "--context", type=int, default=None, help="tokens per sequence (default: the model's)"
    )
    plan.add_argument("--model", default="kimi-k2.6", choices=sorted(MODELS))
    plan.add_argument("--kv-cache-dtype", default="bf16", choices=sorted(KV_BYTES))
    plan.add_argument(
        "--dp-attention",
        action="store_true",
        help="data-parallel attention (throughput; replicates the attention weights)",
    )
    plan.add_argument(
        "--deepep", action="store_true", help="DeepEP all-to-all for the experts (see docs)"
    )
    plan.add_argument(
        "--dist-init-addr",
        default=DIST_INIT_PLACEHOLDER,
        metavar="HOST:PORT",
        help="node 0's address for multi-node runs (default: a placeholder)",
    )
    plan.set_defaults(func=cmd_model_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claw", description="Claw: groups of humans and AI agents on shared task graphs."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start the platform (embedded, or services mode when CLAW_REDIS_URL is set)",
        description="Migrate the database if needed, then serve the web app with a Celery "
        "worker and beat: in this process (embedded) or as supervised child processes.",
    )
    up.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000)")
    up.add_argument(
        "--demo", action="store_true", help="create a demo user and group; print the login"
    )
    up.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="Celery worker concurrency in services mode (default 2)",
    )
    up.set_defaults(func=cmd_up)

    from claw.device.cli import add_commands as add_device_commands

    add_device_commands(commands)  # `claw device pair`, `claw agent run`
    add_model_commands(commands)  # `claw model plan`
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signals
        print("claw: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
