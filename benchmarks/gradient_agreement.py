"""How much of a trainer's gradient is signal: the agreement of the gradients of two independent halves of a rollout.

    OMP_NUM_THREADS=2 python benchmarks/gradient_agreement.py --trainer grpo --rollouts 6 [-- <flow-trl flags>]

Builds `flow-trl <trainer>`'s shapes recipe (with the flags), draws `--rollouts` rollouts from the untrained policy
and splits each into two halves of whole prompt groups (even and odd groups). Each half's loss gradient is computed
as the first optimizer step of that rollout would compute it (every loss chunk, summed), and the two are compared:
the cosine between them. With ``g`` the expected gradient and ``s^2`` the noise variance of one half,
``E[cos] ~ |g|^2 / (|g|^2 + s^2)`` (the standard two-half estimate of the gradient noise scale), so the share of the
whole rollout's squared gradient that is signal is ``2 cos / (1 + cos)``. Independent halves agree only through the
expected gradient: a cosine near 0 means one rollout's update is mostly noise and the weights random-walk. Prints one
line per rollout and the mean; no weight is updated.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import torch


def half(inputs: dict[str, Any], rows: torch.Tensor, n: int) -> dict[str, Any]:
    """The rows `rows` of every per-sample entry of a rollout's training inputs (tensors and conditionings whose
    first dimension is the batch size `n`: images, or DPO's preference pairs)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            value = {k: v[rows.to(v.device)] for k, v in value.items()}
        elif isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
            value = value[rows.to(value.device)]
        out[key] = value
    return out


def flat_gradient(trainer, inputs: dict[str, Any]) -> torch.Tensor:
    """The gradient of every loss chunk of `inputs` (summed) over the trained parameters, flattened."""
    model = trainer.transformer
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    for chunk in range(trainer._num_loss_chunks(inputs)):
        trainer._compute_loss(model, inputs, chunk).backward()
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


def recipe_trainer(name: str, flags: list[str], output_dir: str):
    """The trainer `flow-trl <name> <flags>` builds on the shapes world (its recipe, the flags on top), not trained."""
    from flow_trl.scripts.utils import parse_with_shapes_defaults, quiet_start

    quiet_start()
    script = importlib.import_module(f"flow_trl.scripts.{name}").SCRIPT
    script_args, training_args = parse_with_shapes_defaults(
        script.make_parser(), [*flags, "--output_dir", output_dir, "--overwrite_output_dir", "true"],
        script.shapes_defaults,
    )
    return script.build(script_args, training_args), training_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="grpo", choices=["nft", "awm", "dpo", "grpo"])
    parser.add_argument("--rollouts", type=int, default=6)
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]

    trainer, training_args = recipe_trainer(args.trainer, flags, "/tmp/gradient-agreement")
    trainer.transformer.train()
    batches = iter(trainer.get_train_dataloader())
    group = training_args.num_generations
    cosines, rewards = [], []
    for r in range(args.rollouts):
        trainer.state.global_step = r
        rows = next(batches)
        inputs = trainer._generate_and_score(rows)
        n = inputs["latents"].shape[0]  # images, or DPO's pairs (the same number per prompt group)
        num_groups = len(rows) // group
        groups = torch.arange(n) // (n // num_groups)  # each row's prompt group
        g_a = flat_gradient(trainer, half(inputs, torch.nonzero(groups % 2 == 0).flatten(), n))
        g_b = flat_gradient(trainer, half(inputs, torch.nonzero(groups % 2 == 1).flatten(), n))
        cos = torch.nn.functional.cosine_similarity(g_a, g_b, dim=0).item()
        cosines.append(cos)
        rewards.append(trainer._metrics["train"]["reward"][-1])
        print(f"rollout {r}: reward {rewards[-1]:.3f}  cos {cos:+.4f}  |g_a| {g_a.norm():.3e}  |g_b| {g_b.norm():.3e}")
    mean = sum(cosines) / len(cosines)
    sem = torch.tensor(cosines).std().item() / len(cosines) ** 0.5 if len(cosines) > 1 else float("nan")
    print(f"{args.trainer} {' '.join(flags)}: mean cos {mean:+.4f} (+- {sem:.4f}), signal share "
          f"{2 * max(mean, 0) / (1 + max(mean, 0)):.3f}, reward {sum(rewards) / len(rewards):.3f}")


if __name__ == "__main__":
    main()
