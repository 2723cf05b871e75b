"""DanceGRPO with group-std advantages vs SLAS on the shapes world: several seeds, same budget.

    python benchmarks/grpo_slas.py [--seeds 0 1 2] [--max_steps 200] [--output_dir runs/grpo-slas]

Each run is `flow-trl dance_grpo`'s shapes recipe (benchmarks/shapes.py's harness) with the shapes score as the
reward and the prompt-independent quality as a zero-weight (logged only) second reward, evaluated on the held-out
split every `--eval_steps`. Writes `results.json` and `grpo_slas_curves.png` (mean and range over seeds of the
held-out score and quality), and prints the final numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


CONFIGS = {
    "group std (DanceGRPO)": {"advantage_shaping": "none", "scale_rewards": "group"},
    "SLAS (gamma 1)": {"advantage_shaping": "slas", "slas_gamma": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="runs/grpo-slas")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Recipe overrides (YAML values).")
    args = parser.parse_args()
    import yaml

    sys.path.insert(0, str(Path(__file__).parent))
    from shapes import recipe, run

    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    max_steps = args.max_steps or recipe("grpo")[1]["max_steps"]
    out = Path(args.output_dir)
    results: dict = {}
    for name, config in CONFIGS.items():
        for seed in args.seeds:
            overrides = {**config, **extra, "seed": seed, "reward_funcs": ["shapes", "shapes_quality"],
                         "reward_weights": [1.0, 0.0], "eval_num_per_family": 24}
            folder = out / f"{config['advantage_shaping']}-seed{seed}"
            res = run("grpo", folder, max_steps, args.eval_steps, 0.0, args.threads, overrides)
            results.setdefault(name, []).append(res)
    summary = {}
    for name, runs in results.items():
        finals = [r["report"]["after"] for r in runs]
        summary[name] = {
            "score_before": runs[0]["report"]["before"]["score"],
            "score_after": [round(f["score"], 4) for f in finals],
            "quality_after": [round(f["quality"], 4) for f in finals],
            "minutes": [round(r["minutes"], 2) for r in runs],
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2, default=str))
    print(json.dumps(summary, indent=2))
    _plot(results, out / "grpo_slas_curves.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = (("eval_rewards/shapes/mean", "held-out shapes score"), ("eval_rewards/shapes_quality/mean", "quality"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, runs in results.items():
        for ax, (key, label) in zip(axes, keys):
            curves = [[(e["step"], e[key]) for e in r["history"] if key in e] for r in runs]
            steps = [s for s, _ in curves[0]]
            values = np.array([[v for _, v in c] for c in curves])
            ax.plot(steps, values.mean(0), marker="o", label=name)
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
            ax.set(xlabel="optimizer step", ylabel=label)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"DanceGRPO on the shapes world ({len(next(iter(results.values())))} seeds, mean and range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
