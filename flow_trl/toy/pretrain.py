"""Reproduce the shipped shapes pipeline: pretrain the VAE, then the transformer and text encoders, on rendered shapes.

    python -m flow_trl.toy.pretrain --output_dir my-shapes-sd3

Stage 1 trains the `AutoencoderKL` for reconstruction (MSE + a small KL) and sets its `shift_factor` and
`scaling_factor` from the latent statistics, as SD3's VAE config does. Stage 2 trains the `SD3Transformer2DModel`
and the three text encoders by rectified-flow matching with SD3's conventions: logit-normal timesteps passed
through the scheduler's sigma shift, ``x_sigma = (1 - sigma) x0 + sigma noise``, velocity target ``noise - x0``,
``timestep = 1000 sigma``, and 10% empty prompts so classifier-free guidance works. Only prompts of the ``train``
split are seen, so held-out prompts measure generalisation. The transformer is saved from an EMA of its weights.
Everything is seeded; on 2 CPU cores the default budget takes about 25 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .pipeline import MAX_SEQUENCE_LENGTH, SHAPES_PIPELINE_DIR, build_untrained_pipeline
from .world import render_batch, split_prompts


def _log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_pool(num_images: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Random train-split prompts and one rendering each, as uint8 ``[N, 3, 64, 64]``."""
    rows = split_prompts("train")
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(rows), size=num_images)
    prompts = [rows[i]["prompt"] for i in picks]
    images = render_batch(prompts, [int(s) for s in rng.integers(2**31, size=num_images)])
    return prompts, (images * 255).round().to(torch.uint8)


def _to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int):
    """Reconstruction training; afterwards sets ``shift_factor``/``scaling_factor`` from the latent statistics."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = _to_model_range(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(_to_model_range(images[i : i + 256])).latent_dist.mean for i in range(0, 2048, 256)]
        )
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    _log(f"vae latent shift_factor {shift:.4f} scaling_factor {scale:.4f}")


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``(mean - shift) * scale`` for every image (the VAE posterior mean)."""
    out = []
    for i in range(0, len(images), 256):
        z = vae.encode(_to_model_range(images[i : i + 256])).latent_dist.mean
        out.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
    return torch.cat(out)


def sample_sigmas(batch_size: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """SD3 training timesteps: logit-normal(0, 1), then the scheduler's static shift ``s u / (1 + (s - 1) u)``."""
    u = torch.sigmoid(torch.randn(batch_size, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then constant (``"constant"``) or warm-up-stable-decay (``"wsd"``: linear decay to 0 over the
    last `decay_fraction` of the steps)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps)
    decay_start = int(args.transformer_steps * (1 - args.decay_fraction))
    if args.lr_schedule == "wsd" and step >= decay_start:
        lr = args.lr * (args.transformer_steps - step) / (args.transformer_steps - decay_start)
    return lr


def train_transformer(pipe, prompts: list[str], latents: torch.Tensor, args: argparse.Namespace) -> None:
    """Flow matching on ``(prompt, latent)`` pairs; the transformer and the three text encoders are trained."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema = copy.deepcopy(pipe.transformer).requires_grad_(False)
    shift = pipe.scheduler.config.shift
    for step in range(args.transformer_steps):
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        drop = torch.rand(args.batch_size, generator=gen) < args.cfg_dropout
        batch_prompts = ["" if d else prompts[i] for i, d in zip(idx.tolist(), drop.tolist())]
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            batch_prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(args.batch_size, shift, gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        v = pipe.transformer(
            hidden_states=xt, encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=sigma * 1000
        ).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), pipe.transformer.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == args.transformer_steps - 1:
            _log(f"transformer step {step}/{args.transformer_steps} loss {loss.item():.4f} lr {lr:.2e}")
    pipe.transformer.load_state_dict(ema.state_dict())
    for m in modules:
        m.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(SHAPES_PIPELINE_DIR), help="Where to save the pipeline.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random choice.")
    parser.add_argument("--num_images", type=int, default=20000, help="Rendered training images.")
    parser.add_argument("--vae_steps", type=int, default=500, help="VAE optimizer steps.")
    parser.add_argument("--vae_batch_size", type=int, default=32, help="VAE batch size.")
    parser.add_argument("--vae_lr", type=float, default=1e-3, help="VAE learning rate.")
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the VAE's KL term.")
    parser.add_argument("--transformer_steps", type=int, default=2700, help="Transformer optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=64, help="Transformer batch size.")
    parser.add_argument("--lr", type=float, default=4e-3, help="Transformer/text-encoder peak learning rate.")
    parser.add_argument("--warmup_steps", type=int, default=200, help="Linear warm-up steps.")
    parser.add_argument("--lr_schedule", choices=["constant", "wsd"], default="wsd",
                        help="After warm-up: constant, or warm-up-stable-decay (linear decay to 0 at the end).")
    parser.add_argument("--decay_fraction", type=float, default=0.3, help="Share of the steps the 'wsd' decay takes.")
    parser.add_argument("--qk_norm", default="rms_norm", help="Attention query/key normalisation ('none': off).")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the saved transformer.")
    parser.add_argument("--cfg_dropout", type=float, default=0.1, help="Fraction of empty prompts.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--skip_eval", action="store_true", help="Do not score the result on held-out prompts.")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.time()
    pipe = build_untrained_pipeline(seed=args.seed, qk_norm=None if args.qk_norm == "none" else args.qk_norm)
    _log(f"rendering {args.num_images} training images")
    prompts, images = render_pool(args.num_images, args.seed)
    train_vae(pipe.vae, images, args.vae_steps, args.vae_batch_size, args.vae_lr, args.kl_weight, args.seed)
    latents = encode_latents(pipe.vae, images)
    train_transformer(pipe, prompts, latents, args)
    pipe.vae.requires_grad_(False)
    output_dir = Path(args.output_dir)
    pipe.save_pretrained(output_dir)
    minutes = (time.time() - start) / 60
    _log(f"saved to {output_dir} after {minutes:.1f} min")
    report = {"train_minutes": round(minutes, 2), "args": vars(args)}
    if not args.skip_eval:
        from .evaluation import evaluate_pipeline

        report["eval"] = evaluate_pipeline(pipe, grid_path=output_dir.parent / f"{output_dir.name}-grid.png")
        _log(json.dumps(report["eval"], indent=1))
    return report


if __name__ == "__main__":
    main()
