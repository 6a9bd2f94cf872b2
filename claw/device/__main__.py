"""`python -m claw.device device pair …` / `python -m claw.device agent run …`: the device
commands without the server's CLI (the `claw` command registers the same ones)."""

import argparse
import sys

from claw.device.cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m claw.device", description="The Claw device runtime."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_commands(commands)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
