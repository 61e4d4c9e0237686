"""`moetune` command line: argparse only builds configs; each subcommand lives in its own module.

Every module in COMMANDS exposes `add_arguments(parser)` and `main(args) -> int`. Expected failures (bad
input: ValueError, which every config and moetune.errors.UserError raise, and OSError on a path) end as
one line, `moetune <command>: error: <what>; <what to do>`, with exit status 2, as argparse's own errors
do; Ctrl-C ends with one line and 130; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from moetune.errors import path_error

# name -> (module, one-line help). Modules are imported lazily so `moetune --help` stays fast.
COMMANDS = {
    "generate": ("moetune.commands.generate", "plain greedy or sampled decoding with a target model"),
    "run": ("moetune.commands.run", "speculative decoding on held-out prompts, with a summary table"),
    "record": ("moetune.commands.record", "record counterfactual traces for offline replay"),
    "profile": ("moetune.commands.profile", "measure and fit a verification latency profile"),
    "replay": ("moetune.commands.replay", "replay traces offline against policies"),
    "widen": ("moetune.commands.widen", "build a wider, expert-bound stand-in of a MoE target (function-preserving)"),
}


def build_parser(load: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moetune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name in load:
            importlib.import_module(module).add_arguments(sp)
    return p


def message(error: Exception) -> str:
    """An expected failure as one line; an OSError that names its path says what went wrong there."""
    if isinstance(error, OSError) and error.filename is not None:
        error = path_error(str(error.filename), error, "check the path and its permissions")
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # exits: 2 with argparse's message for an unknown command or flag, 0 for --help
        parser.print_help()
        return 0 if not argv else 2
    args = build_parser(load=(name,)).parse_args(argv)
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"moetune {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"moetune {name}: error: {message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
