"""`moetune` command line: argparse only builds configs; each subcommand lives in its own module.

Every module in COMMANDS exposes `add_arguments(parser)` and `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `moetune --help` stays fast.
COMMANDS = {
    "generate": ("moetune.commands.generate", "plain greedy or sampled decoding with a target model"),
    "run": ("moetune.commands.run", "speculative decoding on held-out prompts, with a summary table"),
    "record": ("moetune.commands.record", "record counterfactual traces for offline replay"),
    "profile": ("moetune.commands.profile", "measure and fit a verification latency profile"),
    "replay": ("moetune.commands.replay", "replay traces offline against policies"),
}


def build_parser(load: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moetune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name in load:
            importlib.import_module(module).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        build_parser().print_help() if name is None else build_parser().parse_args(argv)
        return 0 if name is None else 2
    args = build_parser(load=(name,)).parse_args(argv)
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(args) or 0)
    except ValueError as e:
        print(f"moetune {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
