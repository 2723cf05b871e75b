"""Step-wise sampling (training-free): does a DRM choosing among K SDE branches at each step raise the held-out score?

    flow-trl drm                                   # the DRM, in shapes-drm/
    python benchmarks/drm_stepwise.py --drm shapes-drm --num_per_family 48 [--branches 1 4] [--best_of 4]

Samples the held-out shapes rows (`evaluation_rows`, fixed seeds for the initial noise) with the shipped base model:
plain ODE (Euler, the default sampler), then step-wise sampling with each K in `--branches` (K = 1 is plain SDE
sampling with the same step and noise level), then best-of-N with each N in `--best_of`: N ODE samples per row (the
first from the row's own noise, the others from other seeds), of which the DRM keeps the one it scores highest at
sigma 0. Costs per image with n steps: ODE n generator forwards; step-wise K branches n generator forwards (the
branches share each step's velocity) and K (n - 1) DRM forwards; best-of-N N n generator and N DRM forwards.
Reports the shapes score (GenEval partial credit), strict accuracy, the DRM score of the final images, forwards per
image, and wall time relative to ODE sampling.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drm", required=True, help="Path of the trained DiffusionRewardModel.")
    parser.add_argument("--branches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--best_of", type=int, nargs="*", default=[4], help="N of DRM-picked best-of-N ODE sampling.")
    parser.add_argument("--noise_level", type=float, default=0.5)
    parser.add_argument("--step_type", default="dance_sde")
    parser.add_argument("--num_inference_steps", type=int, default=10)
    parser.add_argument("--num_per_family", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from flow_trl.drm import DRMReward, stepwise_sample
    from flow_trl.models import get_adapter
    from flow_trl.sampling import rollout, sigma_grid
    from flow_trl.toy import aggregate, evaluation_rows, load_shapes_pipeline, score_batch

    pipe = load_shapes_pipeline()
    adapter = get_adapter(pipe)
    reward = DRMReward(args.drm, pipe)
    rows = evaluation_rows(args.num_per_family, args.seed)
    sigmas = sigma_grid(args.num_inference_steps, adapter.scheduler_shift)
    res = adapter.default_resolution

    def initial_noise(sub: list[dict], offset: int = 0) -> torch.Tensor:
        return torch.cat(
            [
                adapter.initial_noise(1, res, res, torch.Generator().manual_seed(r["seed"] + offset), torch.float32)
                for r in sub
            ]
        )

    def velocity_of(cond: dict):
        """The policy's velocity field under the prompts' conditioning `cond`."""
        return lambda x, s: adapter.velocity(adapter.transformer, x, s, cond)

    def sample(k: int | None, best_of: int | None = None) -> dict:
        latents, elapsed, forwards = [], 0.0, (args.num_inference_steps, 0)
        for i in range(0, len(rows), args.batch_size):
            sub = rows[i : i + args.batch_size]
            cond = adapter.encode_prompts([r["prompt"] for r in sub])
            noise = initial_noise(sub)
            velocity = velocity_of(cond)
            if best_of is not None:  # candidate j of row r is row j * len(sub) + r
                cond_n = adapter.encode_prompts([r["prompt"] for r in sub] * best_of)
                noise_n = torch.cat([noise] + [initial_noise(sub, 10**6 * j) for j in range(1, best_of)])
            start = time.perf_counter()
            if best_of is not None:
                candidates = rollout(velocity_of(cond_n), noise_n, sigmas).latents
                scores = reward.score_latents(candidates, 0.0, cond_n).view(best_of, len(sub))
                picks = scores.argmax(dim=0) * len(sub) + torch.arange(len(sub), device=scores.device)
                latents.append(candidates[picks])
                forwards = (best_of * args.num_inference_steps, best_of)
            elif k is None:
                latents.append(rollout(velocity, noise, sigmas).latents)
            else:
                out = stepwise_sample(
                    velocity,
                    lambda x, s: reward.score_latents(x, s, cond),  # noqa: B023
                    noise,
                    sigmas,
                    num_branches=k,
                    step_type=args.step_type,
                    noise_level=args.noise_level,
                    generator=torch.Generator().manual_seed(args.seed + i),
                )
                latents.append(out.latents)
                forwards = (out.num_policy_forwards, out.num_scorer_forwards)
            elapsed += time.perf_counter() - start
        x = torch.cat(latents)
        images = torch.cat([adapter.decode(x[i : i + 64]) for i in range(0, len(x), 64)])
        metrics = aggregate(score_batch(images, rows))
        drm = reward([r["prompt"] for r in rows], images).mean().item()
        return {
            "score": round(metrics["score"], 4),
            "strict": round(metrics["strict"], 4),
            "quality": round(metrics["quality"], 4),
            "drm": round(drm, 4),
            "generator_forwards_per_image": forwards[0],
            "drm_forwards_per_image": forwards[1],
            "seconds_per_image": elapsed / len(rows),
        }

    torch.set_grad_enabled(False)
    results = {"ode": sample(None)}
    for k in args.branches:
        results[f"stepwise_k{k}"] = sample(k)
    for n in args.best_of:
        results[f"best_of_{n}"] = sample(None, best_of=n)
    base = results["ode"]["seconds_per_image"]
    for value in results.values():
        value["wall_time_vs_ode"] = round(value["seconds_per_image"] / base, 2)
        value["seconds_per_image"] = round(value["seconds_per_image"], 4)
    print(json.dumps({"rows": len(rows), "config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
