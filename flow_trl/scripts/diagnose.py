"""`flow-trl diagnose`: NormGuard's diagnostics of shapes-world models (base, or with trained LoRAs).

    flow-trl diagnose --lora shapes-nft shapes-nft-normguard --output_dir diagnose

For the base model and each LoRA (its reference: the same pipeline with the LoRA disabled), on held-out prompts:

1. the velocity-norm profile along the model's own ODE trajectories (`norm_profile.png`, the paper's Figure 3);
2. the held-out shapes score with and without inference-time renormalisation to the reference's norm (eq. 3,
   Table 1), at each `--steps` count (few-step evaluation, Table 4);
3. the norm-scaling sensitivity S(t) for the differentiable `soft_color_reward` (`sensitivity.png`, Figure 4).

Writes `diagnose.json` and the plots to `--output_dir` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..cli import UsageError, exit_on_usage_error
from .utils import check_at_least, check_lora_paths, check_pipeline_dir, quiet_loading, quiet_start


def make_parser(prog: str = "flow-trl diagnose") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(parser)
    return parser


@exit_on_usage_error
def cli(argv: list[str] | None = None, prog: str = "flow-trl diagnose") -> dict:
    quiet_start()
    return run(make_parser(prog).parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Pipeline directory; defaults to the shipped shapes pipeline.")
    parser.add_argument("--lora", nargs="*", default=[], help="Directories of diffusers-format LoRAs to diagnose.")
    parser.add_argument("--num_per_family", type=int, default=16, help="Held-out prompts per GenEval family.")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 4], help="ODE step counts to evaluate.")
    parser.add_argument("--sensitivity_samples", type=int, default=24, help="Samples for S(t) (with gradients).")
    parser.add_argument("--output_dir", default="diagnose", help="Where diagnose.json and the plots go.")


def _velocity_fns(pipe, rows: list[dict[str, Any]]):
    from ..diagnostics import pipeline_velocity_fns

    return pipeline_velocity_fns(pipe, [r["prompt"] for r in rows],
                                 max_sequence_length=pipe.tokenizer_3.model_max_length)


def _noise(adapter, rows: list[dict[str, Any]]) -> torch.Tensor:
    size = adapter.default_resolution
    return torch.cat([adapter.initial_noise(1, size, size, torch.Generator().manual_seed(r["seed"]), torch.float32)
                      for r in rows])


def diagnose_pipeline(pipe, rows: list[dict[str, Any]], steps: list[int], sensitivity_samples: int) -> dict:
    """Profile, score with/without renormalisation per step count, and S(t) statistics of one pipeline."""
    from ..diagnostics import norm_scaling_sensitivity, renormalized, sensitivity_stats, velocity_norm_profile
    from ..models import get_adapter
    from ..sampling import rollout
    from ..toy.scorer import aggregate, score_batch, soft_color_reward

    adapter = get_adapter(pipe)
    size = adapter.default_resolution
    policy, reference = _velocity_fns(pipe, rows)
    noise = _noise(adapter, rows)
    result: dict[str, Any] = {
        "profile": velocity_norm_profile(policy, reference, noise, adapter.sigma_grid(steps[0], size, size))
    }
    for n in steps:
        grid = adapter.sigma_grid(n, size, size)
        for name, fn in (("plain", policy), ("renorm", renormalized(policy, reference))):
            with torch.no_grad():
                images = adapter.decode(rollout(fn, noise, grid).latents)
            scores = aggregate(score_batch(images, rows))
            result[f"score@{n}/{name}"] = scores["score"]
            result[f"quality@{n}/{name}"] = scores["quality"]
    picked = rows[:sensitivity_samples]
    policy_s, _ = _velocity_fns(pipe, picked)
    prompts = [r["prompt"] for r in picked]

    def reward(latents: torch.Tensor) -> torch.Tensor:
        return soft_color_reward(prompts, adapter.decode(latents, requires_grad=True))

    grid = adapter.sigma_grid(steps[0], size, size)
    sensitivity = norm_scaling_sensitivity(policy_s, noise[: len(picked)], grid, reward)
    result["sensitivity"] = sensitivity_stats(sensitivity.detach())
    return result


def run(args: argparse.Namespace) -> dict:
    from ..diagnostics import plot_norm_profiles, plot_sensitivity
    from ..toy import evaluation_rows, load_shapes_pipeline

    check_at_least("--num_per_family", args.num_per_family)
    check_at_least("--sensitivity_samples", args.sensitivity_samples)
    if min(args.steps) < 1:
        raise UsageError(f"--steps must all be at least 1; got {args.steps}.")
    check_pipeline_dir(args.model)
    check_lora_paths(args.lora)
    rows = evaluation_rows(args.num_per_family)
    results = {}
    for lora in [None, *args.lora]:
        with quiet_loading():
            pipe = load_shapes_pipeline(args.model)
            if lora:
                pipe.load_lora_weights(lora)
        pipe.transformer.requires_grad_(False)
        name = Path(lora).name if lora else "base"
        results[name] = diagnose_pipeline(pipe, rows, args.steps, args.sensitivity_samples)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(results, indent=2))
    plot_norm_profiles({k: v["profile"] for k, v in results.items()}, out / "norm_profile.png")
    first = next(iter(results.values()))
    plot_sensitivity(results[list(results)[-1]]["sensitivity"], first["profile"]["sigma"], out / "sensitivity.png")
    _print(results, args.steps)
    print(f"wrote {out / 'diagnose.json'}, {out / 'norm_profile.png'} and {out / 'sensitivity.png'}")
    return results


def _print(results: dict, steps: list[int]) -> None:
    print(f"{'model':<22}{'mean |v|/|v_ref|':>18}" + "".join(f"{f'score@{n}':>11}{'+renorm':>9}" for n in steps))
    for name, res in results.items():
        ratio = sum(res["profile"]["ratio_mean"]) / len(res["profile"]["ratio_mean"])
        cells = "".join(f"{res[f'score@{n}/plain']:>11.3f}{res[f'score@{n}/renorm']:>9.3f}" for n in steps)
        print(f"{name:<22}{ratio:>18.3f}{cells}")
    for name, res in results.items():
        nsr = res["sensitivity"]["noise_to_signal"]
        print(f"{name}: S(t) noise-to-signal per step {min(nsr):.1f}x to {max(nsr):.1f}x")
