"""Step-GRPO vs terminal-reward GRPO on the shapes world, with the same DRM as the reward, budget and seeds.

    flow-trl drm                                   # the DRM, in shapes-drm/
    python benchmarks/step_grpo.py --drm shapes-drm --seeds 0 1 2 [--max_steps 60] [--eval_steps 15]
    python benchmarks/step_grpo.py --merge runs/a/results.json runs/b/results.json --plot out.png  # seeds apart

Both runs are `flow-trl step_grpo`'s GRPO recipe (`SHAPES_GRPO_LORA_RECIPE` and the command's LoRA: r16, lr 3e-3,
32 images per step, 8 per prompt, 10 steps, Dance-SDE eta 0.3, clip 1e-3, `timestep_fraction` 0.4: 4 of the 9
stochastic transitions per sample; `--learning_rate` overrides the lr). GRPO's
reward is the DRM on the final images (terminal); Step-GRPO's advantages come from the DRM on every stored state
(`--step_advantage`) and its terminal reward is logged only. The shapes score is a zero-weight second reward (logged,
evaluated). Both are evaluated on the 177 held-out prompts (ODE, fixed seeds) before training and every `--eval_steps`.
Reports, per seed, the first evaluation step at which Step-GRPO's held-out DRM score reaches GRPO's final one, and
writes `results.json` and (with `--plot`) the curves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run(method: str, seed: int, args, out: Path) -> dict:
    import torch

    from flow_trl import DanceGRPOConfig, DanceGRPOTrainer, StepGRPOConfig, StepGRPOTrainer
    from flow_trl.drm import DRMReward
    from flow_trl.scripts.grpo import SHAPES_GRPO_LORA_RECIPE
    from flow_trl.scripts.utils import ScriptArguments, build_peft_config
    from flow_trl.toy import load_shapes_pipeline, shapes_dataset

    torch.set_num_threads(args.threads)
    pipe = load_shapes_pipeline()
    recipe = {k: v for k, v in SHAPES_GRPO_LORA_RECIPE.items() if k != "output_dir"}
    common = dict(
        recipe,
        output_dir=str(out / f"{method}-seed{seed}"),
        seed=seed,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate or recipe["learning_rate"],
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        per_device_eval_batch_size=64,
        reward_weights=[1.0, 0.0],
    )
    rewards = [DRMReward(args.drm, pipe), "shapes"]
    kwargs = dict(
        reward_funcs=rewards,
        train_dataset=shapes_dataset("train"),
        eval_dataset=shapes_dataset("test"),
        peft_config=build_peft_config(ScriptArguments()),  # the command's default LoRA
    )
    if method == "grpo":
        trainer = DanceGRPOTrainer(pipe, args=DanceGRPOConfig(**common), **kwargs)
    else:
        config = StepGRPOConfig(**common, step_advantage=args.step_advantage)
        trainer = StepGRPOTrainer(pipe, args=config, drm=rewards[0].drm, **kwargs)
    start = time.time()
    first = trainer.evaluate()
    trainer.train()
    minutes = (time.time() - start) / 60
    evals = [{"step": 0, **first}] + [e for e in trainer.state.log_history if "eval_reward" in e]
    curve = [
        {"step": e["step"], "drm": e["eval_rewards/drm/mean"], "shapes": e["eval_rewards/shapes/mean"]} for e in evals
    ]
    return {"minutes": round(minutes, 2), "curve": curve}


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first evaluation step whose held-out DRM score is at least `target` (None if never)."""
    return next((point["step"] for point in curve if point["drm"] >= target), None)


def summarize(runs: dict, seeds: list[int]) -> dict:
    """Per seed: held-out DRM and shapes scores before/after, and the steps each method needs to reach GRPO's final
    held-out DRM score."""
    summary = {}
    for seed in seeds:
        grpo, step = runs[f"grpo-seed{seed}"], runs[f"step_grpo-seed{seed}"]
        target = grpo["curve"][-1]["drm"]
        summary[seed] = {
            "drm_before": round(grpo["curve"][0]["drm"], 4),
            "grpo_final_drm": round(target, 4),
            "step_grpo_final_drm": round(step["curve"][-1]["drm"], 4),
            "grpo_steps_to_grpo_final": steps_to_reach(grpo["curve"], target),
            "step_grpo_steps_to_grpo_final": steps_to_reach(step["curve"], target),
            "shapes_before": round(grpo["curve"][0]["shapes"], 4),
            "grpo_final_shapes": round(grpo["curve"][-1]["shapes"], 4),
            "step_grpo_final_shapes": round(step["curve"][-1]["shapes"], 4),
            "minutes": [grpo["minutes"], step["minutes"]],
        }
    return summary


def plot(runs: dict, seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, colour in (("grpo", "tab:blue"), ("step_grpo", "tab:orange")):
        for k, seed in enumerate(seeds):
            curve = runs[f"{method}-seed{seed}"]["curve"]
            for ax, key in zip(axes, ("drm", "shapes")):
                label = ("GRPO (terminal DRM)" if method == "grpo" else "Step-GRPO") if k == 0 else None
                ax.plot(
                    [p["step"] for p in curve],
                    [p[key] for p in curve],
                    "o-",
                    color=colour,
                    alpha=0.7,
                    label=label,
                    ms=3,
                )
    axes[0].set_ylabel("held-out DRM score (the reward)")
    axes[1].set_ylabel("held-out shapes score (not optimised)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drm", help="Path of the trained DiffusionRewardModel.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--eval_steps", type=int, default=15)
    parser.add_argument("--learning_rate", type=float, default=None, help="Default: the GRPO recipe's.")
    parser.add_argument("--step_advantage", default="score")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="runs/step-grpo")
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="Do not train: summarise (and plot) the runs of these results.json files (seeds run in "
        "separate processes).",
    )
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": vars(args), "runs": {}}
    if args.merge:
        for path in args.merge:
            results["runs"].update(json.loads(Path(path).read_text())["runs"])
    else:
        if args.drm is None:
            parser.error("--drm is required unless --merge is given.")
        for seed in args.seeds:
            for method in ("grpo", "step_grpo"):
                results["runs"][f"{method}-seed{seed}"] = run(method, seed, args, out)
                (out / "results.json").write_text(json.dumps(results, indent=2))
    results["summary"] = summarize(results["runs"], args.seeds)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))
    if args.plot:
        plot(results["runs"], args.seeds, args.plot)


if __name__ == "__main__":
    main()
