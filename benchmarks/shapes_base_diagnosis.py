"""Where the shipped shapes model fails: finish ground-truth images from increasing noise levels.

    python benchmarks/shapes_base_diagnosis.py [--num_per_family 16] [--num_inference_steps 20]

Each held-out row's ground-truth render is VAE-encoded, noised to a starting sigma of the sampling grid (one fixed
noise per row) and denoised by the base model with Euler ODE steps on the rest of the grid. Starting at sigma 1 is
plain generation. The score against the starting sigma shows at which noise levels the model loses what the prompt
asks for; the shape histogram shows which shapes it can draw.

Shape control: renders of one-object prompts ("a photo of a red square", all 15 colour-shape pairs, 4 seeds each)
are noised the same way and finished twice, once with their own prompt and once with the shape word swapped
("... red circle"). How often the result holds the prompt's shape, and how often the render's, shows from which
noise level the prompt, rather than the noisy image, decides the shape. Prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_per_family", type=int, default=16, help="Held-out rows per family.")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Steps of the full sampling grid.")
    parser.add_argument("--start_sigmas", type=float, nargs="+", default=[0.2, 0.35, 0.5, 0.7, 0.8, 0.9, 1.0],
                        help="Starting noise levels (each rounded down to the grid).")
    parser.add_argument("--model", default=None, help="Pipeline directory; defaults to the shipped shapes pipeline.")
    args = parser.parse_args()

    from flow_trl.models import get_adapter
    from flow_trl.sampling import rollout
    from flow_trl.toy import evaluation_rows, load_shapes_pipeline, render_batch
    from flow_trl.toy.pipeline import MAX_SEQUENCE_LENGTH
    from flow_trl.toy.scorer import aggregate, detect_objects, score_batch
    from flow_trl.toy.world import COLORS, SHAPES

    pipe = load_shapes_pipeline(args.model)
    adapter = get_adapter(pipe, MAX_SEQUENCE_LENGTH)
    rows = evaluation_rows(args.num_per_family)
    prompts = [r["prompt"] for r in rows]
    truth = render_batch(prompts, [r["seed"] for r in rows])
    with torch.no_grad():
        x0 = adapter.encode_images(truth)
        cond = adapter.encode_prompts(prompts)
        grid = adapter.sigma_grid(args.num_inference_steps, truth.shape[-2], truth.shape[-1])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

        def finish(clean, eps, start, c):
            """Noise `clean` to the grid sigma at or below `start`, finish it with Euler ODE steps: (sigma, images)."""
            j = int((grid[:-1] <= start + 1e-6).nonzero()[0])
            x = (1 - grid[j]) * clean + grid[j] * eps
            out = rollout(lambda z, s: adapter.predict(pipe.transformer, z, s, c), x, grid[j:])
            return float(grid[j]), adapter.decode(out.latents)

        results = {"vae_round_trip": aggregate(score_batch(adapter.decode(x0), rows))["score"], "start": {}}
        for start in sorted(args.start_sigmas):
            sigma, images = finish(x0, noise, start, cond)
            shapes = collections.Counter(str(o["shape"]) for im in images for o in detect_objects(im))
            metrics = aggregate(score_batch(images, rows))
            results["start"][f"{sigma:.3f}"] = {
                "score": round(metrics["score"], 3), "quality": round(metrics["quality"], 3), "shapes": dict(shapes)
            }
        # shape control: each one-object render finished with its prompt and with the shape word swapped
        truth_prompts, swapped, seeds = [], [], []
        for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
            for k in range(4):
                other = SHAPES[(SHAPES.index(shape) + 1 + k % 2) % len(SHAPES)]
                truth_prompts.append(f"a photo of a {color} {shape}")
                swapped.append(f"a photo of a {color} {other}")
                seeds.append(10_000 + 4 * i + k)
        x0_one = adapter.encode_images(render_batch(truth_prompts, seeds))
        noise_one = torch.randn(x0_one.shape, generator=torch.Generator().manual_seed(1))
        results["shape_control"] = {}
        prompt_sets = {"own_prompt": truth_prompts, "swapped_prompt": swapped}
        conds = {name: adapter.encode_prompts(prompts_j) for name, prompts_j in prompt_sets.items()}
        for start in sorted(args.start_sigmas):
            entry = {}
            for name, prompts_j in prompt_sets.items():
                sigma, images = finish(x0_one, noise_one, start, conds[name])
                found = [{o["shape"] for o in detect_objects(im)} for im in images]
                entry[f"{name}: prompt's shape"] = round(
                    sum(p.split()[-1] in f for p, f in zip(prompts_j, found)) / len(found), 3
                )
                if name == "swapped_prompt":
                    entry[f"{name}: render's shape"] = round(
                        sum(p.split()[-1] in f for p, f in zip(truth_prompts, found)) / len(found), 3
                    )
            results["shape_control"][f"{sigma:.3f}"] = entry
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
