"""`flow-trl evaluate`: the held-out GenEval-style score of a shapes-world pipeline, optionally with a LoRA.

    flow-trl evaluate --lora shapes-nft/ --output_dir shapes-eval

Prints the score per family, writes `metrics.json` and a sample grid (`grid.png`) to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import exit_on_usage_error
from .utils import check_at_least, check_lora_paths, check_pipeline_dir, quiet_loading, quiet_start


def make_parser(prog: str = "flow-trl evaluate") -> argparse.ArgumentParser:
    from ..toy.evaluation import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="Pipeline directory; defaults to the shipped shapes pipeline.")
    parser.add_argument("--lora", default=None, help="Directory or file of diffusers-format LoRA weights to load.")
    parser.add_argument("--num_per_family", type=int, default=48, help="Held-out samples per GenEval family (>= 1).")
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="ODE steps.")
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="CFG scale.")
    parser.add_argument("--seed", type=int, default=0, help="First sampling seed.")
    parser.add_argument("--output_dir", default="shapes-eval", help="Where metrics.json and grid.png go.")
    return parser


def print_table(metrics: dict[str, float]) -> None:
    from ..toy.world import TAGS

    print(f"{'family':<15}{'score':>8}{'strict':>8}")
    for tag in TAGS:
        print(f"{tag:<15}{metrics[f'score/{tag}']:>8.3f}{metrics[f'strict/{tag}']:>8.3f}")
    print(f"{'overall':<15}{metrics['score']:>8.3f}{metrics['strict']:>8.3f}   quality {metrics['quality']:.3f}")


def run(args: argparse.Namespace) -> dict[str, float]:
    """Load the pipeline (and LoRA), evaluate it, write ``metrics.json`` and ``grid.png``."""
    check_at_least("--num_per_family", args.num_per_family)
    check_pipeline_dir(args.model)
    check_lora_paths([args.lora] if args.lora else [])
    import torch

    from ..toy import evaluate_pipeline, load_shapes_pipeline

    torch.manual_seed(args.seed)
    with quiet_loading():
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
    print_table(metrics)
    print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'grid.png'}")
    return metrics


@exit_on_usage_error
def cli(argv: list[str] | None = None, prog: str = "flow-trl evaluate") -> dict[str, float]:
    quiet_start()
    return run(make_parser(prog).parse_args(argv))


if __name__ == "__main__":
    cli()
