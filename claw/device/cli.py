"""`claw device pair` and `claw agent run`, registered on any argparse subparsers object:

    from claw.device.cli import add_commands
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(); sys.exit(args.func(args))

Each command's func takes the parsed arguments and returns an exit status: 0 fine, 1 pairing
refused, 2 bad usage or config, 3 unauthorized or revoked, 4 replaced by another connection
of the same agent, 5 protocol error. Nothing here imports Django.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from claw.device.client import AgentClient, FatalConnectionError
from claw.device.config import (
    DEVICE_KINDS,
    ConfigError,
    PairingError,
    config_path,
    load_config,
    pair,
    save_config,
    state_dir,
)
from claw.device.toolkits import ToolkitNotFound, available_toolkits, load_toolkits

CONFIG_HELP = "device config file (default: $CLAW_DEVICE_CONFIG or ~/.config/claw/device.json)"


def add_commands(subparsers) -> None:
    device = subparsers.add_parser(
        "device", help="pair this machine with a Claw server", description="Manage this device."
    )
    device_commands = device.add_subparsers(dest="device_command", metavar="COMMAND")
    device_commands.required = True
    pair_parser = device_commands.add_parser(
        "pair",
        help="exchange a pairing code for a device token",
        description="Exchange a pairing code (from a group owner) for a device token, saved "
        "with mode 0600 in the device config file.",
    )
    pair_parser.add_argument("--server", required=True, help="the server's URL, http(s)://…")
    pair_parser.add_argument("--code", required=True, help="the pairing code, e.g. K7QM-3XPA")
    pair_parser.add_argument("--name", required=True, help="a name for this device")
    pair_parser.add_argument("--kind", choices=DEVICE_KINDS, default="laptop")
    pair_parser.add_argument("--platform", default=None, help="default: this OS and machine")
    pair_parser.add_argument("--config", default=None, help=CONFIG_HELP)
    pair_parser.set_defaults(func=cmd_device_pair)

    agent = subparsers.add_parser(
        "agent", help="run an agent on this device", description="Run agents on this device."
    )
    agent_commands = agent.add_subparsers(dest="agent_command", metavar="COMMAND")
    agent_commands.required = True
    run = agent_commands.add_parser(
        "run",
        help="connect an agent and work on the tasks it is given",
        description="Connect an agent to the server and run the tasks it is assigned, until "
        "SIGTERM or Ctrl-C (then it drains: running attempts get --grace seconds).",
    )
    run.add_argument("--name", required=True, help="the agent's name (unique on this device)")
    run.add_argument(
        "--toolkit",
        dest="toolkits",
        action="append",
        default=[],
        metavar="SLUG",
        help=f"a toolkit this agent may use; repeat for more ({', '.join(available_toolkits())})",
    )
    run.add_argument("--capacity", type=int, default=1, help="attempts at once (default 1)")
    run.add_argument(
        "--workdir", default=None, help="where tools run (default: a folder next to the config)"
    )
    run.add_argument("--config", default=None, help=CONFIG_HELP)
    run.add_argument(
        "--grace", type=float, default=30.0, help="seconds running attempts get on stop"
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    llm = run.add_argument_group(
        "model", "run tasks that have instructions but no steps with a model (claw.device.llm)"
    )
    llm.add_argument(
        "--llm",
        action="store_true",
        help="declare the llm toolkit and run such tasks in a tool-calling loop",
    )
    llm.add_argument("--llm-model", default="kimi-k2.6", help="model name (default kimi-k2.6)")
    llm.add_argument(
        "--llm-base-url",
        default=None,
        help="OpenAI-compatible endpoint (default: the server's gateway, SERVER/v1, with the "
        "device token as the key)",
    )
    llm.add_argument("--llm-api-key", default=None, help="default: the device token")
    llm.add_argument("--llm-max-turns", type=int, default=50, help="model calls per attempt")
    llm.add_argument(
        "--llm-context-tokens",
        type=int,
        default=200_000,
        help="conversation budget before old tool outputs are shortened (default 200000)",
    )
    llm.add_argument(
        "--llm-chars-per-token", type=float, default=3.5, help="token estimate (default 3.5)"
    )
    llm.add_argument("--llm-temperature", type=float, default=None)
    run.set_defaults(func=cmd_agent_run)


def cmd_device_pair(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        config = pair(args.server, args.code, args.name, args.kind, args.platform)
    except PairingError as exc:
        print(f"claw: pairing failed: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"claw: {exc}", file=sys.stderr)
        return 2
    if path.exists():
        print(f"claw: replacing the previous device config at {path}", file=sys.stderr)
    save_config(config, path)
    print(f"Paired device {config.name!r} (id {config.device_id}) with {config.server}.")
    print(f"Its token is saved in {path} (mode 0600).")
    suffix = f" --config {path}" if args.config else ""
    print(f"Start an agent: claw agent run --name NAME --toolkit shell{suffix}")
    return 0


def _setup_logging(name: str, level: str) -> None:
    logger = logging.getLogger("claw.device")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s claw-agent[{name}] %(levelname)s %(message)s")
    )
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def _llm_toolkit(args: argparse.Namespace, config):
    from claw.device.llm import LLMSettings, LLMToolkit

    server = config.server.rstrip("/")
    return LLMToolkit(
        LLMSettings(
            base_url=args.llm_base_url or f"{server}/v1",
            api_key=args.llm_api_key or config.token,
            model=args.llm_model,
            max_turns=args.llm_max_turns,
            context_tokens=args.llm_context_tokens,
            chars_per_token=args.llm_chars_per_token,
            temperature=args.llm_temperature,
            server=server,
            token=config.token,
        )
    )


def cmd_agent_run(args: argparse.Namespace) -> int:
    _setup_logging(args.name, args.log_level)
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"claw: {exc}", file=sys.stderr)
        return 2
    use_llm = args.llm or "llm" in args.toolkits
    args.toolkits = [slug for slug in args.toolkits if slug != "llm"]
    if not args.toolkits and not use_llm:
        print(
            "claw: name the toolkits this agent may use, e.g. --toolkit shell --toolkit files "
            f"(available: {', '.join(available_toolkits())})",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.capacity <= 256:
        print("claw: --capacity must be from 1 to 256", file=sys.stderr)
        return 2
    try:
        toolkits = load_toolkits(dict.fromkeys(args.toolkits))
    except ToolkitNotFound as exc:
        print(f"claw: {exc}", file=sys.stderr)
        return 2
    if use_llm:
        if args.llm_max_turns < 1 or args.llm_context_tokens < 1000:
            print("claw: --llm-max-turns ≥ 1 and --llm-context-tokens ≥ 1000", file=sys.stderr)
            return 2
        toolkits["llm"] = _llm_toolkit(args, config)
    state = state_dir(path, args.name)
    workdir = Path(args.workdir).expanduser() if args.workdir else state / "work"
    client = AgentClient(
        config=config,
        name=args.name,
        toolkits=toolkits,
        capacity=args.capacity,
        workdir=workdir,
        state_dir=state,
        grace_s=args.grace,
    )
    print(
        f"claw agent {args.name!r}: device {config.name!r} (id {config.device_id}), "
        f"server {config.server}, toolkits {', '.join(toolkits)}, capacity {args.capacity}, "
        f"workdir {workdir}",
        flush=True,
    )
    try:
        return asyncio.run(client.run())
    except FatalConnectionError as exc:
        print(f"claw agent {args.name!r} stopped: {exc.message}", file=sys.stderr, flush=True)
        return exc.exit_code
