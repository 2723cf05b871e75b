"""The mean reward of a trainer's rollouts from the untrained model: what its sampler and prompts score, no update.

    OMP_NUM_THREADS=2 python benchmarks/rollout_reward.py --trainer grpo --rollouts 6 [-- <flow-trl flags>]

Builds `flow-trl <trainer>`'s shapes recipe (with the flags), draws `--rollouts` rollouts (the training prompts the
seed's dataloader gives, the trainer's own sampler) and prints each rollout's mean reward and their mean. Two flag
sets with the same seed see the same prompts, so their difference is the sampler's (e.g. an SDE against its ODE
limit) or the prompt mix's (`--balance_families`).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="grpo", choices=["nft", "awm", "dpo", "grpo"])
    parser.add_argument("--rollouts", type=int, default=6)
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]

    from gradient_agreement import recipe_trainer  # this folder is on sys.path when the script runs

    trainer, _ = recipe_trainer(args.trainer, flags, "/tmp/rollout-reward")
    batches = iter(trainer.get_train_dataloader())
    rewards = []
    for r in range(args.rollouts):
        trainer.state.global_step = r
        with torch.no_grad():
            trainer._generate_and_score(next(batches))
        rewards.append(trainer._metrics["train"]["reward"][-1])
        print(f"rollout {r}: reward {rewards[-1]:.3f}")
    mean = sum(rewards) / len(rewards)
    print(f"{args.trainer} {' '.join(flags)}: mean reward {mean:.3f} over {args.rollouts} rollouts")


if __name__ == "__main__":
    main()
