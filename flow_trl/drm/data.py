"""Preference pairs for DRM training from a generator's own samples, labelled by a reward function.

On the shapes world this is how `flow-trl drm` builds its data (ours): the base model samples each prompt
`num_samples` times (ODE, different seeds), the shapes scorer rates every sample, and every two samples of a prompt
whose scores differ by at least `min_gap` form a pair (higher score chosen). With `cross_prompt_samples`, each
prompt's pool also holds samples drawn for *other* prompts (of the same family with `cross_prompt_column`), rescored
against this prompt: pairs then also differ in whether the image matches the text, which a DRM trained on same-prompt
pairs alone can ignore (docs/drm.md). The pairs hold latents
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
    cross_prompt_samples: int = 0,
    cross_prompt_column: str | None = None,
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
        cross_prompt_samples (`int`, defaults to `0`): samples of other rows added to each row's pool, rescored by
            the reward functions against this row's prompt and columns (drawn at random with `seed`).
        cross_prompt_column (`str`, *optional*): borrow only from rows with the same value in this column (e.g.
            `"tag"`, the shapes world's family), so the borrowed images are near misses rather than unrelated.

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
    latents, scores, images = [], [], []
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
        decoded = adapter.decode(x)
        scores.append(weighted_reward(compute_rewards(funcs, prompts, decoded, _columns(sub))))
        latents.append(x.float().cpu())
        if cross_prompt_samples:
            images.append(decoded.cpu())
    latents, scores = torch.cat(latents), torch.cat(scores)
    pools = [
        [(j, scores[j].item()) for j in range(i * num_samples, (i + 1) * num_samples)] for i in range(len(rows))
    ]
    if cross_prompt_samples:
        borrowed = _borrow(rows, num_samples, cross_prompt_samples, cross_prompt_column, seed)
        _rescore_borrowed(funcs, rows, torch.cat(images), borrowed, pools, batch_size)
    out: dict[str, list] = {
        "prompt": [],
        LATENT_COLUMNS[0]: [],
        LATENT_COLUMNS[1]: [],
        "chosen_score": [],
        "rejected_score": [],
    }
    extra = [key for key in rows[0] if key != "prompt"]
    out.update({key: [] for key in extra})
    for row, pool in zip(rows, pools):
        for a, b in combinations(pool, 2):
            if abs(a[1] - b[1]) < min_gap:
                continue
            win, lose = (a, b) if a[1] > b[1] else (b, a)
            out["prompt"].append(row["prompt"])
            out[LATENT_COLUMNS[0]].append(latents[win[0]].numpy())
            out[LATENT_COLUMNS[1]].append(latents[lose[0]].numpy())
            out["chosen_score"].append(win[1])
            out["rejected_score"].append(lose[1])
            for key in extra:
                out[key].append(row[key])
    if not out["prompt"]:
        raise ValueError(f"No pair has a reward gap of at least min_gap={min_gap}; lower it or sample more.")
    dataset = Dataset.from_dict(out)
    dataset.set_format("torch", columns=list(LATENT_COLUMNS), output_all_columns=True)
    return dataset


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    """The rows' non-prompt columns, as the reward functions receive them."""
    return {key: [r[key] for r in rows] for key in rows[0] if key != "prompt"}


def _borrow(
    rows: list[dict[str, Any]], num_samples: int, count: int, column: str | None, seed: int
) -> list[list[int]]:
    """Per row, `count` distinct sample indices of other rows (with the same `column` value, if given)."""
    if column is not None and column not in rows[0]:
        raise ValueError(f"cross_prompt_column={column!r} is not a column of the rows; they have {sorted(rows[0])}.")
    generator = torch.Generator().manual_seed(seed)
    borrowed = []
    for i, row in enumerate(rows):
        others = [j for j, r in enumerate(rows) if j != i and (column is None or r[column] == row[column])]
        candidates = torch.tensor([j * num_samples + k for j in others for k in range(num_samples)], dtype=torch.long)
        if len(candidates) < count:
            raise ValueError(
                f"Row {i} has only {len(candidates)} samples of other rows to borrow from; lower cross_prompt_samples "
                f"(got {count}) or unset cross_prompt_column."
            )
        borrowed.append(candidates[torch.randperm(len(candidates), generator=generator)[:count]].tolist())
    return borrowed


def _rescore_borrowed(funcs, rows, images, borrowed, pools, batch_size: int) -> None:
    """Score every borrowed image against its borrowing row and add it to that row's pool."""
    pairs = [(i, j) for i, js in enumerate(borrowed) for j in js]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        sub = [rows[i] for i, _ in chunk]
        values = weighted_reward(
            compute_rewards(funcs, [r["prompt"] for r in sub], images[[j for _, j in chunk]], _columns(sub))
        )
        for (i, j), value in zip(chunk, values.tolist()):
            pools[i].append((j, value))


__all__ = ["sample_preference_pairs"]
