"""The held-out shapes score during a `flow-trl <trainer>` run, against optimizer steps and training minutes.

    python benchmarks/heldout_curve.py --trainer nft --every 25 --output_dir runs/nft-curve
    OMP_NUM_THREADS=1 python benchmarks/heldout_curve.py --trainer nft --every 75 --output_dir runs/nft-s3 -- --seed 3
    python benchmarks/heldout_curve.py --trainer <nft|awm|dpo|grpo|step_grpo|opd> --every N [-- <flow-trl flags>]

The first two produce docs/benchmarks.md's NFT tables (the curve along the README's command; one row of the
six-seed table).

Runs the command exactly as `flow-trl <trainer> <flags>` does (its shapes recipe, its before/after table) and, every
`--every` optimizer steps, scores the current policy on the same 288 family-balanced held-out rows as that table
(`flow_trl.toy.evaluate_pipeline`). The evaluations use their own seeded generators, so the training run is the
command's own; their time is left out of the training minutes. Prints a table and writes `curve.json` and
`heldout_curve.png` to --output_dir.

`--side_ema_decays 0.9 0.97` also keeps weight EMAs of the trained weights alongside (`ParameterEMA`, the class behind
`weight_ema_decay`; they never feed back into training, so the run stays the command's own) and scores each on the
same rows after the last step: one run compares the trained weights with several averages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from contextlib import nullcontext
from pathlib import Path

from transformers import TrainerCallback


class HeldOutCurve(TrainerCallback):
    """Scores the trainer's policy (its weight EMA if it keeps one) every `every` steps; `points` holds (step,
    training minutes, metrics)."""

    def __init__(self, trainer, script_args, every: int):
        self.trainer, self.script_args, self.every = trainer, script_args, every
        self.points: list[dict] = []
        self.start = time.time()
        self.eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        from flow_trl.scripts.utils import shapes_report

        minutes = (time.time() - self.start - self.eval_seconds) / 60
        began = time.time()
        ema = self.trainer.weight_ema  # what the trainer would evaluate and save (`weight_ema_decay`)
        with ema.applied() if ema is not None else nullcontext():
            metrics = shapes_report(self.trainer, self.script_args, f"step{state.global_step:04d}")
        self.eval_seconds += time.time() - began
        self.points.append({"step": state.global_step, "training_minutes": minutes, **metrics})
        print(f"step {state.global_step}: held-out {metrics['score']:.3f} after {minutes:.1f} training minutes")


class SideEMAs(TrainerCallback):
    """Weight EMAs of the trainer's trained weights, updated after every optimizer step and scored after the last;
    `results` maps each decay to its metrics."""

    def __init__(self, trainer, script_args, decays: list[float]):
        from flow_trl.trainer.ema import ParameterEMA

        self.trainer, self.script_args = trainer, script_args
        self.emas = {decay: ParameterEMA(trainer.transformer, decay) for decay in decays}
        self.results: dict[float, dict] = {}

    def on_step_end(self, args, state, control, **kwargs):
        from flow_trl.scripts.utils import shapes_report

        for ema in self.emas.values():
            ema.update(state.global_step)
        if state.global_step != state.max_steps:
            return
        for decay, ema in self.emas.items():
            with ema.applied():
                self.results[decay] = shapes_report(self.trainer, self.script_args, f"ema{decay}")


def plot(points: list[dict], before: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    minutes = [0.0] + [p["training_minutes"] for p in points]
    ax.plot(minutes, [before] + [p["score"] for p in points], marker="o", label="held-out score")
    ax.axhline(before + 0.10, color="gray", linestyle="--", label="base + 0.10")
    ax.axvline(15, color="gray", linestyle=":", label="15 minutes")
    for p in points[1::2]:
        ax.annotate(str(p["step"]), (p["training_minutes"], p["score"]), fontsize=7, textcoords="offset points",
                    xytext=(0, 5))
    ax.set_xlabel("training minutes (labels: optimizer steps)")
    ax.set_ylabel("held-out shapes score (288 rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="nft", choices=["nft", "awm", "dpo", "grpo", "step_grpo", "opd"])
    parser.add_argument("--every", type=int, default=50, help="Optimizer steps between evaluations.")
    parser.add_argument("--output_dir", default=None, help="Default: runs/<trainer>-curve.")
    parser.add_argument("--side_ema_decays", type=float, nargs="*", default=[],
                        help="Weight EMA decays to keep alongside and score after the last step.")
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]
    output_dir = args.output_dir or f"runs/{args.trainer}-curve"

    from flow_trl.scripts.utils import parse_with_shapes_defaults, quiet_start, run_training

    quiet_start()

    script = importlib.import_module(f"flow_trl.scripts.{args.trainer}").SCRIPT
    script_args, training_args = parse_with_shapes_defaults(
        script.make_parser(), [*flags, "--output_dir", output_dir], script.shapes_defaults
    )
    if script_args.model is not None:
        raise ValueError("The held-out curve is the shapes world's; run it without --model.")
    trainer = script.build(script_args, training_args)  # e.g. opd's teachers, dpo's pairs from samples
    curve = HeldOutCurve(trainer, script_args, args.every)
    trainer.add_callback(curve)
    side = SideEMAs(trainer, script_args, args.side_ema_decays) if args.side_ema_decays else None
    if side is not None:
        trainer.add_callback(side)
    report = run_training(trainer, script_args, training_args)

    before = report["before"]["score"]
    print(f"\n{'step':>6}{'training min':>14}{'score':>8}{'gain':>8}{'strict':>8}{'quality':>9}")
    for p in curve.points:
        print(f"{p['step']:>6}{p['training_minutes']:>14.1f}{p['score']:>8.3f}{p['score'] - before:>+8.3f}"
              f"{p['strict']:>8.3f}{p['quality']:>9.3f}")
    side_emas = {str(decay): metrics for decay, metrics in side.results.items()} if side is not None else {}
    for decay, metrics in side_emas.items():
        print(f"EMA {decay}: {metrics['score']:.3f} (strict {metrics['strict']:.3f}, "
              f"quality {metrics['quality']:.3f})")
    out = Path(output_dir)
    (out / "curve.json").write_text(json.dumps({"before": report["before"], "after": report["after"],
                                                "points": curve.points, "side_emas": side_emas, "flags": flags},
                                               indent=1))
    plot(curve.points, before, out / "heldout_curve.png")
    print(f"curve.json and heldout_curve.png in {out}/")


if __name__ == "__main__":
    main()
