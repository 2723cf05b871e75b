"""Preference pairs for DRM training from a generator's own samples, labelled by a reward function.

On the shapes world this is how `flow-trl drm` builds its data (ours): the base model samples each prompt
`num_samples` times (ODE, different seeds), the shapes scorer rates every sample, and every two samples of a prompt
whose scores differ by at least `min_gap` form a pair (higher score chosen). The pairs hold latents
(`chosen_latents`, `rejected_latents`, flow_trl's latent preference format), so no VAE round trip is needed.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import torch

from ..models import get_adapter
from ..preference import LATENT_COLUMNS
from ..rewards import compute_rewards, resolve_reward_funcs, weighted_reward
from ..sampling import rollout, sigma_grid


@torch.no_grad()
def sample_preference_pairs(
    pipe,
    rows: list[dict[str, Any]],
    reward_funcs,
    num_samples: int = 4,
    min_gap: float = 0.25,
    num_inference_steps: int = 10,
    seed: int = 0,
    batch_size: int = 64,
):
    """Sample, score and pair.

    Args:
        pipe: the generator's pipeline (SD3 family).
        rows (`list[dict]`): prompt rows (a `prompt` key; other keys reach the reward functions as columns).
        reward_funcs: reward functions or built-in names (e.g. `"shapes"`); several are summed.
        num_samples (`int`, defaults to `4`): samples per prompt (sample ``k`` of row ``i`` has seed
            ``seed + i * num_samples + k``).
        min_gap (`float`, defaults to `0.25`): minimum reward difference of a pair.
        num_inference_steps (`int`, defaults to `10`): ODE steps on the pipeline's shifted grid.
        seed (`int`, defaults to `0`): first sampling seed.
        batch_size (`int`, defaults to `64`): images per forward.

    Returns:
        `datasets.Dataset` with `prompt`, `chosen_latents`, `rejected_latents` (torch format), `chosen_score`,
        `rejected_score`, and the rows' other columns.
    """
    from datasets import Dataset

    adapter = get_adapter(pipe)
    funcs = resolve_reward_funcs(reward_funcs)
    resolution = adapter.default_resolution
    sigmas = sigma_grid(num_inference_steps, adapter.scheduler_shift)
    samples = [(i, k) for i in range(len(rows)) for k in range(num_samples)]
    latents, scores = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        sub = [rows[i] for i, _ in chunk]
        prompts = [r["prompt"] for r in sub]
        cond = adapter.encode_prompts(prompts)
        noise = torch.cat(
            [
                adapter.initial_noise(
                    1,
                    resolution,
                    resolution,
                    torch.Generator().manual_seed(seed + i * num_samples + k),
                    adapter.transformer.dtype,
                )
                for i, k in chunk
            ]
        )
        x = rollout(lambda z, s: adapter.velocity(adapter.transformer, z, s, cond), noise, sigmas).latents  # noqa: B023
        columns = {key: [r[key] for r in sub] for key in sub[0] if key != "prompt"}
        scores.append(weighted_reward(compute_rewards(funcs, prompts, adapter.decode(x), columns)))
        latents.append(x.float().cpu())
    latents, scores = torch.cat(latents), torch.cat(scores)
    out: dict[str, list] = {
        "prompt": [],
        LATENT_COLUMNS[0]: [],
        LATENT_COLUMNS[1]: [],
        "chosen_score": [],
        "rejected_score": [],
    }
    extra = [key for key in rows[0] if key != "prompt"]
    out.update({key: [] for key in extra})
    for i, row in enumerate(rows):
        for a, b in combinations(range(i * num_samples, (i + 1) * num_samples), 2):
            if abs(scores[a] - scores[b]) < min_gap:
                continue
            win, lose = (a, b) if scores[a] > scores[b] else (b, a)
            out["prompt"].append(row["prompt"])
            out[LATENT_COLUMNS[0]].append(latents[win].numpy())
            out[LATENT_COLUMNS[1]].append(latents[lose].numpy())
            out["chosen_score"].append(scores[win].item())
            out["rejected_score"].append(scores[lose].item())
            for key in extra:
                out[key].append(row[key])
    if not out["prompt"]:
        raise ValueError(f"No pair has a reward gap of at least min_gap={min_gap}; lower it or sample more.")
    dataset = Dataset.from_dict(out)
    dataset.set_format("torch", columns=list(LATENT_COLUMNS), output_all_columns=True)
    return dataset


__all__ = ["sample_preference_pairs"]
