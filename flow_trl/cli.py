"""The ``flow-trl`` command line.

    flow-trl nft                            # Diffusion-NFT on the shapes world (flags or --config cfg.yaml)
    flow-trl awm                            # Advantage Weighted Matching, likewise
    flow-trl dpo                            # Diffusion-DPO (online; offline with a preference dataset)
    flow-trl dance_grpo (alias grpo)        # GRPO on SDE rollouts (DanceGRPO, Flow-GRPO, SLAS)
    flow-trl drm                            # train a diffusion-based reward model (DRM) on preference pairs
    flow-trl step_grpo                      # Step-wise GRPO: per-step advantages from a DRM
    flow-trl opd                            # Flow-OPD: distil task teachers (LoRAs) into one student
    flow-trl evaluate                       # score the shipped shapes pipeline on held-out prompts
    flow-trl evaluate --lora my-run/        # ... with a diffusers-format LoRA loaded on top
    flow-trl diagnose --lora my-run/        # NormGuard diagnostics: norm profile, renormalisation, S(t)
    flow-trl env                            # versions and device, for bug reports

This module imports nothing heavy: each command's module (and torch) is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from . import __version__


# command -> (module with a `cli(argv, prog)` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "nft": ("flow_trl.scripts.nft", "Train with Diffusion-NFT."),
    "awm": ("flow_trl.scripts.awm", "Train with Advantage Weighted Matching."),
    "dpo": ("flow_trl.scripts.dpo", "Train with Diffusion-DPO (online, or offline on preference pairs)."),
    "dance_grpo": ("flow_trl.scripts.grpo", "Train with GRPO on SDE rollouts (DanceGRPO, Flow-GRPO, SLAS)."),
    "grpo": ("flow_trl.scripts.grpo", "Alias of dance_grpo."),
    "drm": ("flow_trl.scripts.drm", "Train a diffusion-based reward model (DRM) on preference pairs."),
    "step_grpo": ("flow_trl.scripts.step_grpo", "Train with Step-wise GRPO (per-step advantages from a DRM)."),
    "opd": ("flow_trl.scripts.opd", "Distil task teachers into one student with Flow-OPD."),
    "evaluate": ("flow_trl.scripts.evaluate", "Score a shapes-world pipeline on held-out prompts (GenEval-style)."),
    "diagnose": ("flow_trl.scripts.diagnose", "NormGuard diagnostics: norm profiles, renormalisation, S(t)."),
    "env": ("flow_trl.scripts.env", "Print the platform, library versions and device (paste it into bug reports)."),
}
# the training commands (their flags are the fields of a trainer's config dataclass): command -> module
TRAINING_COMMANDS = {
    name: module for name, (module, _) in COMMANDS.items() if name not in ("evaluate", "diagnose", "env")
}


class UsageError(ValueError):
    """A mistake in the command line or its config file: reported as one line on stderr, exit status 2."""


F = TypeVar("F", bound=Callable[..., Any])


def exit_on_usage_error(fn: F) -> F:
    """Run `fn`; a [`UsageError`] becomes ``flow-trl: error: <message>`` on stderr and exit status 2 (no traceback).

    Other exceptions are programming errors and keep their traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as err:
            print(f"flow-trl: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the commands; each command parses its own flags (`flow-trl <command> --help`)."""
    parser = argparse.ArgumentParser(
        prog="flow-trl",
        description="RL post-training for flow-matching image models.",
        epilog="`flow-trl <command> --help` lists a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv and argv[0] in COMMANDS:
        importlib.import_module(COMMANDS[argv[0]][0]).cli(argv[1:], prog=f"flow-trl {argv[0]}")
        return 0
    make_parser().parse_args(argv)  # no command first: prints the help or the version, or the error (exit 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
