import pytest
import torch

from flow_trl.regularizers import norm_guard, velocity_kl, velocity_norm_ratio


def _ref(shape=(3, 4, 6, 6), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _direction(shape=(4, 6, 6), seed=1):
    d = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def test_velocity_norm_ratio_on_constructed_tensors():
    v_ref = _ref()
    v = torch.stack([2 * v_ref[0], 0.5 * v_ref[1], v_ref[1].norm() * _direction()]).detach()  # 2, 1/2, same norm
    ratio = velocity_norm_ratio(v, v_ref)
    assert ratio.shape == (3,)
    expected = torch.stack([torch.tensor(2.0), torch.tensor(0.5), v_ref[1].norm() / v_ref[2].norm()]).detach()
    torch.testing.assert_close(ratio, expected)
    packed = velocity_norm_ratio(3 * v_ref.detach().flatten(2), v_ref.flatten(2))  # 3-D packed latents
    torch.testing.assert_close(packed, torch.full((3,), 3.0))


def test_norm_guard_is_zero_with_zero_gradient_inside_the_budget():
    v_ref = _ref()
    v = torch.stack([0.5 * v_ref[0], v_ref[1], v_ref[2].norm() * 0.99 * _direction()]).detach().requires_grad_()
    loss, metrics = norm_guard(v, v_ref, coef=1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    assert v_ref.grad is None
    assert metrics["norm_guard/active_frac"] == 0.0 and metrics["norm_guard/loss"] == 0.0


def test_norm_guard_value_and_gradient_direction():
    v_ref = _ref()
    # sample 0 inflated 1.5x in a new direction, sample 1 inside the budget, sample 2 inflated 1.1x
    v = torch.stack([
        1.5 * v_ref[0].norm() * _direction(seed=2), 0.8 * v_ref[1], 1.1 * v_ref[2],
    ]).detach().requires_grad_()
    coef = 0.3
    loss, metrics = norm_guard(v, v_ref, coef)

    sq = v.detach().pow(2).sum(dim=(1, 2, 3))
    sq_ref = v_ref.detach().pow(2).sum(dim=(1, 2, 3))
    expected = coef * torch.clamp((sq - sq_ref) / sq_ref, min=0).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, torch.tensor(coef * (1.25 + 0.0 + 0.21) / 3))
    assert metrics["norm_guard/loss"] == pytest.approx(loss.item())
    assert metrics["norm_guard/active_frac"] == pytest.approx(2 / 3)
    assert metrics["velocity_norm_ratio"] == pytest.approx((1.5 + 0.8 + 1.1) / 3, rel=1e-5)

    loss.backward()
    assert v_ref.grad is None
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
    for b in (0, 2):
        cosine = torch.nn.functional.cosine_similarity(v.grad[b].flatten(), v[b].detach().flatten(), dim=0)
        assert cosine.item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(v.grad[b], 2 * coef * v[b].detach() / (3 * sq_ref[b]))


def test_norm_guard_is_fp32_and_rejects_bad_inputs():
    v_ref = _ref().detach()
    loss, _ = norm_guard((1.2 * v_ref).bfloat16(), v_ref.bfloat16(), 1.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.44, rel=2e-2)
    with pytest.raises(ValueError, match="same shape"):
        norm_guard(v_ref[:2], v_ref, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        norm_guard(v_ref, v_ref, -1.0)


def test_velocity_kl_value_and_gradient():
    v_ref = _ref()
    v = (v_ref.detach() + 0.1 * torch.arange(3.0).view(3, 1, 1, 1)).requires_grad_()
    loss, metrics = velocity_kl(v, v_ref, beta=2.0)
    kl = (0.0**2 + 0.1**2 + 0.2**2) / 3
    torch.testing.assert_close(loss, torch.tensor(2.0 * kl))
    assert metrics["kl"] == pytest.approx(kl, rel=1e-5)
    loss.backward()
    assert v_ref.grad is None
    torch.testing.assert_close(v.grad, 2.0 * 2 * (v - v_ref).detach() / v.numel())
