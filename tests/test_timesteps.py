import pytest
import torch

from flow_trl.sampling import sigma_grid
from flow_trl.timesteps import (
    TIMESTEP_SAMPLERS,
    flow_matching_mse,
    flow_target,
    noise_latents,
    sample_training_sigmas,
)


GRID = sigma_grid(10, shift=3.0)


def draw(sampler, n=5, k=4, seed=0, **kwargs):
    return sample_training_sigmas(sampler, n, k, GRID, torch.Generator().manual_seed(seed), **kwargs)


def test_grid_subset_draws_distinct_grid_sigmas_per_sample():
    sigmas = draw("grid_subset", n=6, k=9)
    assert sigmas.shape == (6, 9)
    grid = set(GRID[:-1].tolist())
    for row in sigmas:
        assert len(set(row.tolist())) == 9 and set(row.tolist()) <= grid
    assert not all(torch.equal(sigmas[0], row) for row in sigmas[1:])  # independent per sample


def test_grid_subset_matches_a_per_sample_permutation():
    """NFT's draw: ``randperm(T)[:k]`` per sample from the generator, in that order."""
    g = torch.Generator().manual_seed(3)
    expected = torch.stack([GRID[torch.randperm(10, generator=g)[:3]] for _ in range(4)])
    torch.testing.assert_close(draw("grid_subset", n=4, k=3, seed=3), expected)


@pytest.mark.parametrize("sampler", ["discrete", "discrete_wo_init"])
def test_discrete_samplers_are_stratified_shared_and_skip_the_tail(sampler):
    start = 1 if sampler == "discrete_wo_init" else 0
    allowed = GRID[start:9]  # indices [start, int(0.9 * 10))
    seen = set()
    for seed in range(50):
        sigmas = draw(sampler, k=4, seed=seed)
        assert (sigmas == sigmas[0]).all()  # one draw shared by the whole batch
        row = sigmas[0]
        assert all(any(torch.isclose(s, a) for a in allowed) for s in row)
        assert (row[:-1] > row[1:]).all()  # one index per stratum, strata in grid order
        seen |= set(row.tolist())
    assert len(seen) == len(allowed)
    assert (GRID[0].item() in seen) == (sampler == "discrete")


def test_logit_normal_and_uniform_ranges():
    ln = torch.cat([draw("logit_normal", k=6, seed=s, shift=3.0)[0] for s in range(200)])
    assert ln.min() >= 0.01 and ln.max() < 1
    assert ln.median() > 0.6  # shift 3 moves the logit-normal median 0.5 to 0.75
    un = torch.cat([draw("uniform", k=6, seed=s)[0] for s in range(200)])
    assert un.min() >= 0.2 and un.max() <= 1
    per_sample = draw("logit_normal", n=3, k=2, shared=False)
    assert not torch.equal(per_sample[0], per_sample[1])


def test_unknown_sampler_and_too_many_timesteps():
    with pytest.raises(ValueError, match="Unknown timestep sampler 'cosine'"):
        draw("cosine")
    with pytest.raises(ValueError, match="Cannot draw 11 distinct sigmas"):
        draw("grid_subset", k=11)
    assert set(TIMESTEP_SAMPLERS) == {"grid_subset", "discrete", "discrete_wo_init", "logit_normal", "uniform"}


def test_forward_process():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    sigma = torch.tensor([0.0, 0.25])
    x_t = noise_latents(x0, sigma, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(flow_target(x0, noise), noise - x0)
    v = torch.randn(2, 3)
    torch.testing.assert_close(flow_matching_mse(v, noise), ((v - noise) ** 2).mean(dim=1))
    assert flow_matching_mse(v, noise, torch.float64).dtype == torch.float64
