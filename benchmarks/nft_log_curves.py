"""Training reward and velocity norm ratio against the step, from `flow-trl` runs' logs.

    python benchmarks/nft_log_curves.py --logs shapes-nft/trainer_state.json --labels "flow-trl nft"
    flow-trl nft --output_dir runs/nft                               # also writes runs/nft/trainer_state.json
    flow-trl nft --balance_families false --output_dir runs/nft_unbalanced
    python benchmarks/nft_log_curves.py --logs runs/nft/trainer_state.json runs/nft_unbalanced/trainer_state.json \\
        --labels "balanced" "unbalanced" --plot curve.png

Each log is a run's `trainer_state.json` (written to the output folder by every `flow-trl` training command) or its
captured output (the metric dicts the Trainer prints every `logging_steps`, 10 in the shapes recipes). Prints, per
run, the first, last and highest `velocity_norm_ratio` and the training reward of the first and last five logs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from statistics import mean


def read_logs(path: str, logging_steps: int) -> list[dict[str, float]]:
    """The training-metric dicts of one run, each with its `step`: from `trainer_state.json` or a captured log
    (progress bars and other lines skipped; steps counted in `logging_steps`)."""
    if path.endswith(".json"):
        with open(path) as f:
            return [log for log in json.load(f)["log_history"] if "loss" in log and "velocity_norm_ratio" in log]
    text = open(path).read().replace("\r", "\n")
    lines = re.findall(r"^\s*(\{'loss'.*\})\s*$", text, flags=re.M)
    return [
        {**{k: float(v) for k, v in ast.literal_eval(line).items()}, "step": logging_steps * (i + 1)}
        for i, line in enumerate(lines)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", nargs="+", required=True, help="trainer_state.json files or captured outputs.")
    parser.add_argument("--labels", nargs="+", default=None, help="One legend label per log (default: the paths).")
    parser.add_argument("--logging_steps", type=int, default=10, help="The captured runs' logging_steps.")
    parser.add_argument("--reward", default="rewards/shapes/mean", help="Reward metric to draw.")
    parser.add_argument("--title", default="flow-trl nft on the shapes world")
    parser.add_argument("--plot", default=None, help="PNG path.")
    args = parser.parse_args()
    labels = args.labels or args.logs
    if len(labels) != len(args.logs):
        raise SystemExit(f"--labels needs one label per log: {len(args.logs)} logs, {len(labels)} labels.")
    runs = {
        label: [log for log in read_logs(path, args.logging_steps) if args.reward in log]
        for label, path in zip(labels, args.logs)
    }
    for label, logs in runs.items():
        if not logs:
            raise SystemExit(f"No metric dicts found in the log of {label!r}: was it captured with logging on?")
        ratio = [log["velocity_norm_ratio"] for log in logs]
        reward = [log[args.reward] for log in logs]
        print(f"{label}: {len(logs)} logs; velocity_norm_ratio first {ratio[0]:.3f} last {ratio[-1]:.3f} max "
              f"{max(ratio):.3f}; {args.reward} first 5 {mean(reward[:5]):.3f} last 5 {mean(reward[-5:]):.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, logs in runs.items():
            steps = [log["step"] for log in logs]
            reward = [log[args.reward] for log in logs]
            windows = [reward[max(0, i - 4) : i + 1] for i in range(len(reward))]
            smooth = [mean(w) for w in windows]
            axes[0].plot(steps, smooth, label=label)
            axes[1].plot(steps, [log["velocity_norm_ratio"] for log in logs], label=label)
        axes[0].set_title(f"training reward ({args.reward}, mean of the last 5 logs)", fontsize=9)
        axes[1].set_title("velocity_norm_ratio = mean |v_theta| / |v_ref|", fontsize=9)
        axes[1].axhline(1.0, color="black", lw=0.6, ls=":")
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.legend(fontsize=7)
        fig.suptitle(args.title, fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
