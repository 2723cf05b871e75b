import math

import pytest
import torch

from flow_trl.sampling import STEP_TYPES, Rollout, rollout, shift_sigmas, sigma_grid, step


SDE_TYPES = [t for t in STEP_TYPES if t != "ode"]


def _inputs(shape=(3, 4, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return x, v


def _normal_log_prob(sample, mean, std):
    dims = tuple(range(1, sample.ndim))
    return torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample.float()).mean(dims)


def _view(s, x):
    return s.view(-1, *([1] * (x.ndim - 1)))


# ---- step math ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 16, 12)])
@pytest.mark.parametrize("step_type", SDE_TYPES)
def test_log_prob_is_the_mean_normal_log_density(step_type, shape):
    x, v = _inputs(shape)
    out = step(step_type, x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(1))
    assert out.log_prob.shape == (3,) and out.log_prob.dtype == torch.float32
    assert out.std.shape == (3,) + (1,) * (len(shape) - 1)
    torch.testing.assert_close(out.log_prob, _normal_log_prob(out.prev_sample, out.mean, out.std))


def test_ode_step_is_euler_without_log_prob():
    x, v = _inputs()
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.7, 0.4, 0.0])
    out = step("ode", x, v, sigma, sigma_next)
    expected = x + (sigma_next - sigma).view(3, 1, 1, 1) * v
    torch.testing.assert_close(out.prev_sample, expected)
    torch.testing.assert_close(out.mean, expected)
    assert out.log_prob is None
    assert torch.equal(out.std, torch.zeros(3, 1, 1, 1))


def test_flow_sde_mean_and_std_match_the_reference_formula():
    x, v = _inputs()
    eta = 0.7
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.1])
    out = step("flow_sde", x, v, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(0))
    s, dt = _view(sigma, x), _view(sigma_next - sigma, x)
    std_dev_t = eta * torch.sqrt(s / (1 - s))
    expected_mean = x + (v + std_dev_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    torch.testing.assert_close(out.mean, expected_mean)
    torch.testing.assert_close(out.std, std_dev_t * torch.sqrt(-dt))


def test_flow_sde_at_sigma_one_uses_sigma_max():
    x, v = _inputs()
    eta, sigma_max = 0.7, 0.96
    with pytest.raises(ValueError, match="sigma_max"):
        step("flow_sde", x, v, 1.0, sigma_max, eta)
    out = step("flow_sde", x, v, 1.0, sigma_max, eta, sigma_max=sigma_max, generator=torch.Generator().manual_seed(0))
    std_dev_t = eta * math.sqrt(1.0 / (1 - sigma_max))
    dt = sigma_max - 1.0
    torch.testing.assert_close(out.mean, x + (v + std_dev_t**2 / 2 * x) * dt)  # (1 - sigma) v vanishes at sigma 1
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), std_dev_t * math.sqrt(-dt)))
    assert torch.isfinite(out.log_prob).all()


def test_dance_sde_mean_and_std_match_the_reference_formula():
    x, v = _inputs()
    eta, sigma, sigma_next = 0.3, 0.6, 0.5
    out = step("dance_sde", x, v, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(0))
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    expected = x + (sigma_next - sigma) * v - 0.5 * eta**2 * score * (sigma_next - sigma)
    torch.testing.assert_close(out.mean, expected)
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), eta * math.sqrt(sigma - sigma_next)))


def test_cps_mean_and_std_match_the_reference_formula():
    x, v = _inputs()
    eta, sigma, sigma_next = 0.7, 0.6, 0.5
    out = step("cps", x, v, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(0))
    std = sigma_next * math.sin(eta * math.pi / 2)
    expected = (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * math.sqrt(sigma_next**2 - std**2)
    torch.testing.assert_close(out.mean, expected)
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), std))


@pytest.mark.parametrize("step_type", SDE_TYPES)
def test_sample_has_the_step_mean_and_std(step_type):
    x, v = _inputs((2, 4, 128, 128))
    out = step(step_type, x, v, 0.7, 0.5, 0.7, generator=torch.Generator().manual_seed(3))
    residual = (out.prev_sample - out.mean).flatten(1)
    std = out.std.flatten()
    assert (residual.mean(1).abs() < 0.02 * std).all()
    torch.testing.assert_close(residual.std(1), std, rtol=0.02, atol=0)


# ---- replay and the storage-dtype round trip ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step_type", SDE_TYPES)
def test_replay_gives_the_same_log_prob(step_type, dtype):
    x, v = _inputs(dtype=dtype)
    sampled = step(step_type, x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    assert sampled.prev_sample.dtype == dtype
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    replay = step(step_type, x, v, 0.8, 0.6, 0.7, prev_sample=sampled.prev_sample, generator=generator)
    assert replay.prev_sample is sampled.prev_sample
    assert torch.equal(generator.get_state(), state)  # replay draws no noise
    ratio = torch.exp(replay.log_prob - sampled.log_prob)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


@pytest.mark.parametrize("step_type", SDE_TYPES)
def test_bf16_log_prob_is_taken_after_the_cast(step_type):
    x, v = _inputs((3, 4, 32, 32), dtype=torch.bfloat16)
    out = step(step_type, x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    uncast = out.mean + out.std * noise  # the fp32 sample before the storage cast
    torch.testing.assert_close(uncast.to(torch.bfloat16), out.prev_sample, atol=0, rtol=0)
    logp_uncast = _normal_log_prob(uncast, out.mean, out.std)
    assert (logp_uncast - out.log_prob).abs().max() > 1e-5  # the naive log-prob would fail the replay tolerance
    torch.testing.assert_close(out.log_prob, _normal_log_prob(out.prev_sample.float(), out.mean, out.std))


# ---- invariants --------------------------------------------------------------------------------------------------


def test_step_rejects_invalid_inputs():
    x, v = _inputs()
    with pytest.raises(ValueError, match="valid step types"):
        step("ddim", x, v, 0.5, 0.4)
    for step_type in SDE_TYPES:
        with pytest.raises(ValueError, match="final transition an ODE step"):
            step(step_type, x, v, 0.1, 0.0)
        with pytest.raises(ValueError, match="zero std"):
            step(step_type, x, v, 0.5, 0.4, noise_level=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        step("ode", x, v, 1.5, 0.4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        step("ode", x, v, 0.5, -0.1)
    with pytest.raises(ValueError, match="must not exceed sigma"):
        step("ode", x, v, 0.4, torch.tensor([0.3, 0.5, 0.2]))
    with pytest.raises(ValueError, match="shape"):
        step("ode", x, v[:, :2], 0.5, 0.4)
    with pytest.raises(ValueError, match=r"\[B\] tensor"):
        step("ode", x, v, torch.tensor([0.5, 0.5]), 0.4)


# ---- rollout ------------------------------------------------------------------------------------------------------


def _velocity(x, sigma):
    return 0.5 * x.float() - _view(sigma, x) + 0.1


def _velocity_fn(calls=None):
    """`_velocity`, checking how the rollout calls it: [B] fp32 sigma, no grad."""

    def fn(x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == torch.float32
        assert not torch.is_grad_enabled()
        if calls is not None:
            calls.append(sigma.clone())
        return _velocity(x, sigma)

    return fn


def test_ode_rollout_is_the_euler_loop_and_records_nothing():
    x, _ = _inputs()
    sigmas = sigma_grid(6, shift=3.0)
    calls = []
    out = rollout(_velocity_fn(calls), x, sigmas)
    assert isinstance(out, Rollout)
    assert out.step_indices == [] and out.latents_before is None and out.latents_after is None
    assert out.log_probs is None
    expected = x.clone()
    for j in range(6):
        sigma = sigmas[j].expand(3)
        expected = expected + (sigmas[j + 1] - sigmas[j]) * _velocity(expected, sigma)
    torch.testing.assert_close(out.latents, expected)
    torch.testing.assert_close(torch.stack([c[0] for c in calls]), sigmas[:-1])
    torch.testing.assert_close(out.sigmas, sigmas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_sde_window_records_exactly_its_transitions_and_they_replay(dtype):
    x, _ = _inputs(dtype=dtype)
    sigmas = sigma_grid(5, shift=3.0)
    out = rollout(_velocity_fn(), x, sigmas, "flow_sde", sde_steps=[2, 1], generator=torch.Generator().manual_seed(0))
    assert out.step_indices == [1, 2]
    assert out.latents_before.shape == (3, 2, 4, 8, 8) and out.latents_after.shape == (3, 2, 4, 8, 8)
    assert out.log_probs.shape == (3, 2) and out.log_probs.dtype == torch.float32
    assert out.latents.dtype == dtype and out.latents_after.dtype == dtype
    assert torch.equal(out.latents_after[:, 0], out.latents_before[:, 1])  # consecutive recorded steps
    # the ODE steps before the window are deterministic: x_1 is one Euler step from the noise
    euler = step("ode", x, _velocity(x, sigmas[0].expand(3)), sigmas[0], sigmas[1]).prev_sample
    assert torch.equal(out.latents_before[:, 0], euler)
    for k, j in enumerate(out.step_indices):
        before = out.latents_before[:, k]
        replay = step("flow_sde", before, _velocity(before, sigmas[j].expand(3)), sigmas[j], sigmas[j + 1],
                      0.7, sigma_max=float(sigmas[1]), prev_sample=out.latents_after[:, k])
        ratio = torch.exp(replay.log_prob - out.log_probs[:, k])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


@pytest.mark.parametrize("step_type", SDE_TYPES)
def test_default_sde_steps_are_all_but_the_last_and_start_at_sigma_one(step_type):
    x, _ = _inputs(shape=(2, 16, 6))  # packed FLUX-style latents
    out = rollout(_velocity_fn(), x, sigma_grid(4, shift=3.0), step_type, generator=torch.Generator().manual_seed(0))
    assert out.step_indices == [0, 1, 2]
    assert out.log_probs.shape == (2, 3) and torch.isfinite(out.log_probs).all()
    assert torch.isfinite(out.latents).all()


def test_same_seed_reproduces_the_rollout():
    x, _ = _inputs()
    sigmas = sigma_grid(5)

    def run(seed):
        return rollout(_velocity_fn(), x, sigmas, "dance_sde", 0.3, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)


def test_rollout_rejects_invalid_sde_steps_and_grids():
    x, _ = _inputs()
    sigmas = sigma_grid(4)
    with pytest.raises(ValueError, match="last transition"):
        rollout(_velocity_fn(), x, sigmas, "flow_sde", sde_steps=[1, 3])
    with pytest.raises(ValueError, match="step indices"):
        rollout(_velocity_fn(), x, sigmas, "flow_sde", sde_steps=[4])
    with pytest.raises(ValueError, match="step_type='ode'"):
        rollout(_velocity_fn(), x, sigmas, "ode", sde_steps=[0])
    with pytest.raises(ValueError, match="valid step types"):
        rollout(_velocity_fn(), x, sigmas, "euler")
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout(_velocity_fn(), x, torch.tensor([1.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout(_velocity_fn(), x, torch.tensor([1.0, 0.5, 0.5, 0.0]))


# ---- grids --------------------------------------------------------------------------------------------------------


def test_sigma_grid_applies_the_static_shift_once():
    grid = sigma_grid(10, shift=3.0)
    assert grid.shape == (11,) and grid.dtype == torch.float32
    assert grid[0] == 1.0 and grid[-1] == 0.0
    u = torch.tensor([1 - k / 10 for k in range(10)])
    torch.testing.assert_close(grid[:-1], 3 * u / (1 + 2 * u))
    torch.testing.assert_close(sigma_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(shift_sigmas(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    with pytest.raises(ValueError, match="num_inference_steps"):
        sigma_grid(0)
