"""How reproducible are the labels of the DRM's held-out pairs?

    python benchmarks/drm_label_stability.py

(docs/drm.md's label-stability table; `--num_samples` and `--min_gap` default to drm_accuracy.py's 4 and 0.25.)

Builds the held-out preference pairs exactly as `benchmarks/drm_accuracy.py` does (the shipped base model samples
every held-out prompt `--num_samples` times, seeds from 10**6; two samples of a prompt whose shapes scores differ by
at least `--min_gap` form a pair), then re-labels the same pairs after changes that leave what an image shows the
same: the scorer's thresholds moved a little, the images shifted by one pixel, blurred by a 3x3 binomial kernel, or
sent through the VAE once more (decode -> encode -> decode). Prints, for each change, the fraction of pairs whose
order it keeps (ties count one half), the measure a learned ranker is held to. A ranker that sees the images only
through such a change cannot be expected to beat the agreement that change leaves.

With `--drm <path>` (e.g. `flow-trl drm`'s `shapes-drm/`), also the DRM's pairwise accuracy at sigma 0 on all pairs,
on the clear ones, and on the label-stable ones: the pairs whose order every change above keeps (strictly).
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=4, help="Base-model samples per held-out prompt.")
    parser.add_argument("--min_gap", type=float, default=0.25, help="Minimum shapes-score gap of a pair.")
    parser.add_argument("--clear_gap", type=float, default=0.5, help="Also report the pairs with this gap.")
    parser.add_argument("--drm", default=None, help="A trained DRM: also its accuracy on all/clear/stable pairs.")
    args = parser.parse_args()

    from flow_trl.drm import sample_preference_pairs
    from flow_trl.models import get_adapter
    from flow_trl.toy import load_shapes_pipeline, scorer, split_prompts

    pipe = load_shapes_pipeline()
    adapter = get_adapter(pipe)
    pairs = sample_preference_pairs(pipe, split_prompts("test"), "shapes", args.num_samples, args.min_gap,
                                    seed=10**6)
    columns = pairs[:]  # every row, latents as tensors
    prompts = list(columns["prompt"])
    with torch.no_grad():
        images = {side: adapter.decode(columns[f"{side}_latents"].float()) for side in ("chosen", "rejected")}
    gaps = torch.as_tensor(columns["chosen_score"]) - torch.as_tensor(columns["rejected_score"])
    clear = gaps >= args.clear_gap

    binomial = torch.tensor([0.25, 0.5, 0.25])
    kernel = (binomial[:, None] * binomial[None]).expand(3, 1, 3, 3)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)

    @torch.no_grad()
    def vae_round_trip(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([adapter.decode(adapter.encode_images(chunk)) for chunk in x.split(64)])

    changes = [("none (the labels themselves)", None, None)]
    for name, values in (("COLOR_THRESHOLD", (0.25, 0.35)), ("MIN_SHAPE_IOU", (0.55, 0.65)),
                         ("MAX_ASPECT", (1.4, 1.8)), ("MIN_AREA", (8, 16))):
        default = getattr(scorer, name)
        changes += [(f"scorer {name} {default} -> {v}", (name, v), None) for v in values]
    changes += [
        ("images shifted right by 1 px", None, lambda x: torch.roll(x, 1, dims=3)),
        ("images blurred (3x3 binomial)", None, blur),
        ("images through the VAE again", None, vae_round_trip),
    ]
    results = {"pairs": len(prompts), "clear_pairs": int(clear.sum())}
    stable = torch.ones_like(clear)
    print(f"{len(prompts)} held-out pairs ({int(clear.sum())} with a gap >= {args.clear_gap})")
    print(f"{'change':<44}{'order kept':>12}{'clear pairs':>13}")
    for label, patch, transform in changes:
        with mock.patch.object(scorer, patch[0], patch[1]) if patch else nullcontext():
            scores = {
                side: torch.tensor(scorer.score_batch(transform(x) if transform else x, prompts)["score"])
                for side, x in images.items()
            }
        kept = (scores["chosen"] > scores["rejected"]).float() + 0.5 * (scores["chosen"] == scores["rejected"]).float()
        stable &= scores["chosen"] > scores["rejected"]
        results[label] = {"all": round(kept.mean().item(), 4), "clear": round(kept[clear].mean().item(), 4)}
        print(f"{label:<44}{kept.mean().item():>12.3f}{kept[clear].mean().item():>13.3f}")
    results["stable_pairs"] = int(stable.sum())
    print(f"label-stable pairs (order kept by every change): {int(stable.sum())} of {len(prompts)}")
    if args.drm is not None:
        from flow_trl.drm import DRMReward
        from flow_trl.models import index_conditioning

        reward = DRMReward(args.drm, pipe)
        with torch.no_grad():
            cond = adapter.encode_prompts(prompts)
            drm = {
                side: torch.cat([
                    reward.score_latents(latents, 0.0, index_conditioning(cond, rows)).cpu()
                    for latents, rows in zip(columns[f"{side}_latents"].float().split(64),
                                             torch.arange(len(prompts)).split(64))
                ])
                for side in ("chosen", "rejected")
            }
        right = (drm["chosen"] > drm["rejected"]).float() + 0.5 * (drm["chosen"] == drm["rejected"]).float()
        masks = {"all": torch.ones_like(clear), "clear": clear, "stable": stable, "stable_clear": stable & clear}
        results["drm_accuracy"] = {name: round(right[mask].mean().item(), 4) if mask.any() else None
                                   for name, mask in masks.items()}
        print(f"DRM accuracy at sigma 0: {results['drm_accuracy']} (pairs: "
              f"{ {name: int(mask.sum()) for name, mask in masks.items()} })")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
