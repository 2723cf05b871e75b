"""How far can a LoRA move the shapes base model with *perfect* data in the RL recipes' budget?

    python benchmarks/shapes_sft_bound.py [--max_steps 200] [--learning_rate 3e-3]

Supervised flow matching on ground-truth renders of the training prompts, with the RL recipes' LoRA (r16 on the
attention projections), batch (32 images, 3 training sigmas each from the sampling grid) and learning rate. An RL
trainer sees its own, mostly imperfect samples instead, so this is a rough upper bound on what the recipes' budget
can buy on this base model. Prints the held-out score before and after (288 rows, as `flow-trl nft`).
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=3)
    args = parser.parse_args()

    from peft import LoraConfig

    from flow_trl.models import get_adapter
    from flow_trl.sampling import sigma_grid
    from flow_trl.timesteps import flow_matching_mse, flow_target, noise_latents, sample_training_sigmas
    from flow_trl.toy import evaluate_pipeline, load_shapes_pipeline, render_batch, split_prompts

    torch.manual_seed(0)
    pipe = load_shapes_pipeline()
    adapter = get_adapter(pipe)
    before = evaluate_pipeline(pipe)
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian",
                                       target_modules=list(adapter.default_lora_target_modules)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.max_steps)
    grid = sigma_grid(10, adapter.scheduler_shift)
    rows = split_prompts("train")
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    start = time.time()
    for _ in range(args.max_steps):
        batch = [rng.choice(rows) for _ in range(args.batch_size)]
        x0 = adapter.encode_images(render_batch(batch, [rng.randrange(10**6) for _ in batch]))
        cond = adapter.encode_prompts([r["prompt"] for r in batch])
        sigmas = sample_training_sigmas("grid_subset", len(batch), args.timesteps, grid, generator)
        optimizer.zero_grad()
        for k in range(args.timesteps):
            noise = torch.randn(x0.shape, generator=generator)
            x_t = noise_latents(x0, sigmas[:, k], noise)
            v = adapter.predict(transformer, x_t, sigmas[:, k], cond).float()
            loss = flow_matching_mse(v, flow_target(x0, noise)).mean() / args.timesteps
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    minutes = (time.time() - start) / 60
    transformer.eval()
    after = evaluate_pipeline(pipe)
    print(f"supervised LoRA on ground truth, {args.max_steps} steps in {minutes:.1f} min: held-out score "
          f"{before['score']:.3f} -> {after['score']:.3f} (strict {before['strict']:.3f} -> {after['strict']:.3f}, "
          f"quality {before['quality']:.3f} -> {after['quality']:.3f})")


if __name__ == "__main__":
    main()
