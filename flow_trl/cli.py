"""The ``flow-trl`` command line.

    flow-trl nft                            # Diffusion-NFT on the shapes world (flags or --config cfg.yaml)
    flow-trl awm                            # Advantage Weighted Matching, likewise
    flow-trl dpo                            # Diffusion-DPO (online; offline with a preference dataset)
    flow-trl dance_grpo (alias grpo)        # GRPO on SDE rollouts (DanceGRPO, Flow-GRPO, SLAS)
    flow-trl drm                            # train a diffusion-based reward model (DRM) on preference pairs
    flow-trl step_grpo                      # Step-wise GRPO: per-step advantages from a DRM
    flow-trl evaluate                       # score the shipped shapes pipeline on held-out prompts
    flow-trl evaluate --lora my-run/        # ... with a diffusers-format LoRA loaded on top
    flow-trl diagnose --lora my-run/        # NormGuard diagnostics: norm profile, renormalisation, S(t)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# command -> module with a `cli(argv)` function
TRAINING_COMMANDS = {
    name: f"flow_trl.scripts.{name}" for name in ("nft", "awm", "dpo", "grpo", "drm", "step_grpo", "opd")
}
TRAINING_COMMANDS["dance_grpo"] = TRAINING_COMMANDS["grpo"]


def _print_table(metrics: dict[str, float]) -> None:
    from .toy.world import TAGS

    print(f"{'family':<15}{'score':>8}{'strict':>8}")
    for tag in TAGS:
        print(f"{tag:<15}{metrics[f'score/{tag}']:>8.3f}{metrics[f'strict/{tag}']:>8.3f}")
    print(f"{'overall':<15}{metrics['score']:>8.3f}{metrics['strict']:>8.3f}   quality {metrics['quality']:.3f}")


def evaluate_command(args: argparse.Namespace) -> dict[str, float]:
    """Load a shapes pipeline (optionally with a LoRA), evaluate it, write ``metrics.json`` and ``grid.png``."""
    import torch

    from .toy import evaluate_pipeline, load_shapes_pipeline

    torch.manual_seed(args.seed)
    pipe = load_shapes_pipeline(args.model)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_pipeline(
        pipe,
        num_per_family=args.num_per_family,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        grid_path=output_dir / "grid.png",
    )
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _print_table(metrics)
    print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'grid.png'}")
    return metrics


def make_parser() -> argparse.ArgumentParser:
    from .toy.evaluation import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

    parser = argparse.ArgumentParser(prog="flow-trl", description="RL post-training for flow-matching image models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in TRAINING_COMMANDS:
        sub.add_parser(name, help=f"Train with {name.upper()} (`flow-trl {name} --help` lists its flags).")
    ev = sub.add_parser("evaluate", help="Score a shapes-world pipeline on held-out prompts (GenEval-style).")
    ev.add_argument("--model", default=None, help="Pipeline directory; defaults to the shipped shapes pipeline.")
    ev.add_argument("--lora", default=None, help="Directory or file of diffusers-format LoRA weights to load.")
    ev.add_argument("--num_per_family", type=int, default=48, help="Held-out samples per GenEval family.")
    ev.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="ODE steps.")
    ev.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="CFG scale.")
    ev.add_argument("--seed", type=int, default=0, help="First sampling seed.")
    ev.add_argument("--output_dir", default="shapes-eval", help="Where metrics.json and grid.png go.")
    ev.set_defaults(func=evaluate_command)
    diag = sub.add_parser("diagnose", help="NormGuard diagnostics: norm profiles, renormalisation, S(t).")
    from .scripts import diagnose

    diagnose.add_arguments(diag)
    diag.set_defaults(func=diagnose.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv and argv[0] in TRAINING_COMMANDS:  # training scripts own their (dataclass) flags
        import importlib

        importlib.import_module(TRAINING_COMMANDS[argv[0]]).cli(argv[1:])
        return 0
    args = make_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
