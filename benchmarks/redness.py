"""Does each trainer optimise a reward it can reach? A dense sanity reward on the shapes world.

    python benchmarks/redness.py [--trainers nft awm dpo grpo] [--max_steps 60]

The reward is the mean "redness" of the image, ``10 * mean(max(0, R - (G + B) / 2))``: every image can raise it a
little at a time, so a trainer whose loss, advantages and updates are right raises it within a few dozen steps,
whatever the prompt. Each trainer runs its shapes recipe (flow_trl/scripts/<trainer>.py) with this reward instead of
the shapes score. Prints the training-reward curve of each trainer and writes `runs/redness/results.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path


def redness(prompts, images, **kwargs) -> list[float]:
    """Mean positive excess of red over the other two channels, times 10 (about 0.2 for the base model)."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return (r - (g + b) / 2).clamp(min=0).mean(dim=(1, 2)).mul(10).tolist()


def run(trainer: str, max_steps: int, output_dir: Path) -> dict:
    from peft import LoraConfig

    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

    module = importlib.import_module(f"flow_trl.scripts.{trainer}")
    defaults = dict(getattr(module, f"SHAPES_{trainer.upper()}_DEFAULTS"))
    defaults.update(output_dir=str(output_dir / trainer), max_steps=max_steps, logging_steps=5)
    _, args = module.make_parser().parse_args_and_config([], defaults=defaults)
    trainer_class = getattr(importlib.import_module("flow_trl"), module.SCRIPT.trainer_class)
    start = time.time()
    instance = trainer_class(str(SHAPES_PIPELINE_DIR), args=args, reward_funcs=[redness],
                             train_dataset=shapes_dataset("train"), peft_config=LoraConfig(r=16, lora_alpha=32))
    instance.train()
    curve = [(e["step"], e["reward"]) for e in instance.state.log_history if "reward" in e]
    return {"minutes": (time.time() - start) / 60, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=["nft", "awm", "dpo", "grpo"],
                        choices=["nft", "awm", "dpo", "grpo"])
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--output_dir", default="runs/redness")
    args = parser.parse_args()
    out = Path(args.output_dir)
    results = {name: run(name, args.max_steps, out) for name in args.trainers}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for name, res in results.items():
        first, last = res["curve"][0][1], res["curve"][-1][1]
        print(f"{name}: reward {first:.3f} -> {last:.3f} in {res['curve'][-1][0]} steps, {res['minutes']:.1f} min")


if __name__ == "__main__":
    main()
