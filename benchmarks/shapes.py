"""A trainer on the shapes world, with and without NormGuard: held-out score curve, norm inflation, time.

    python benchmarks/shapes.py --trainer nft --output_dir runs/nft-bench [--max_steps 60] [--norm_guard_coefs 0 1]

Each run is `flow-trl <trainer>`'s shapes recipe (`SHAPES_<TRAINER>_DEFAULTS` in flow_trl/scripts/<trainer>.py) plus
periodic evaluation on the held-out split; `--set key=value` overrides a recipe value (YAML syntax). Prints a table
and writes `results.json` and `<trainer>_shapes_curve.png` to --output_dir.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any


def recipe(trainer: str):
    """The trainer's script module and its shapes-world defaults."""
    module = importlib.import_module(f"flow_trl.scripts.{trainer}")
    return module, getattr(module, f"SHAPES_{trainer.upper()}_DEFAULTS")


def run(trainer: str, output_dir: Path, max_steps: int, eval_steps: int, norm_guard_coef: float, threads: int,
        extra: dict[str, Any]) -> dict:
    import torch

    module, defaults = recipe(trainer)
    torch.set_num_threads(threads)
    overrides = {
        **defaults,
        **extra,
        "output_dir": str(output_dir),
        "max_steps": max_steps,
        "eval_strategy": "steps",
        "eval_steps": eval_steps,
        "norm_guard_coef": norm_guard_coef,
        "logging_steps": 1,
    }
    script_args, training_args = module.make_parser().parse_args_and_config([], defaults=overrides)
    start = time.time()
    report = module.main(script_args, training_args)
    minutes = (time.time() - start) / 60
    return {"minutes": minutes, "report": report, "history": report.pop("log_history")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="nft", choices=["nft", "awm", "dpo", "grpo"])
    parser.add_argument("--output_dir", default=None, help="Default: runs/<trainer>-bench.")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Recipe overrides (YAML values).")
    parser.add_argument("--max_steps", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--eval_steps", type=int, default=10)
    parser.add_argument("--norm_guard_coefs", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import yaml

    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    max_steps = args.max_steps or recipe(args.trainer)[1]["max_steps"]
    out = Path(args.output_dir or f"runs/{args.trainer}-bench")
    results = {}
    for coef in args.norm_guard_coefs:
        results[f"norm_guard_{coef:g}"] = run(args.trainer, out / f"norm_guard_{coef:g}", max_steps, args.eval_steps,
                                              coef, args.threads, extra)
    summary = {}
    for name, res in results.items():
        before, after = res["report"]["before"], res["report"]["after"]
        ratios = [e["velocity_norm_ratio"] for e in res["history"] if "velocity_norm_ratio" in e]
        summary[name] = {
            "minutes": round(res["minutes"], 2),
            "score_before": round(before["score"], 4),
            "score_after": round(after["score"], 4),
            "strict_before": round(before["strict"], 4),
            "strict_after": round(after["strict"], 4),
            "quality_before": round(before["quality"], 4),
            "quality_after": round(after["quality"], 4),
            "velocity_norm_ratio_last10": round(sum(ratios[-10:]) / max(1, len(ratios[-10:])), 4),
            "velocity_norm_ratio_max": round(max(ratios, default=float("nan")), 4),
        }
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2, default=str))
    print(json.dumps(summary, indent=2))
    _plot(results, out / f"{args.trainer}_shapes_curve.png", args.trainer.upper())


def _plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, res in results.items():
        evals = [(e["step"], e["eval_reward"]) for e in res["history"] if "eval_reward" in e]
        ratios = [(e["step"], e["velocity_norm_ratio"]) for e in res["history"] if "velocity_norm_ratio" in e]
        if evals:
            ax1.plot(*zip(*evals), marker="o", label=name)
        if ratios:
            ax2.plot(*zip(*ratios), label=name)
    ax1.set(xlabel="optimizer step", ylabel="held-out shapes score", title=f"{title} on the shapes world")
    ax2.set(xlabel="optimizer step", ylabel="|v| / |v_ref|", title="velocity norm ratio")
    ax2.axhline(1.0, color="gray", lw=0.5)
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
