"""The per-iteration overhead around the transformer: constant-time dtype reads and policy switches, and no
host-device synchronisation inside a rollout or a loss chunk (metrics are read once, when the trainer logs)."""

import copy
from collections import Counter
from contextlib import contextmanager

import diffusers.models.modeling_utils
import pytest
import torch
from helpers import TINY_RUN, tiny_lora, train_prompts
from torch import nn

from flow_trl import (
    DanceGRPOConfig,
    DanceGRPOTrainer,
    FlowAWMConfig,
    FlowAWMTrainer,
    FlowDPOConfig,
    FlowDPOTrainer,
    FlowNFTConfig,
    FlowNFTTrainer,
)
from flow_trl.models import get_adapter
from flow_trl.sampling import rollout, sigma_grid
from flow_trl.trainer.base_trainer import to_floats
from flow_trl.trainer.policies import Policies


# every way a tensor's value reaches the host: each is a synchronisation on an accelerator
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def count_host_reads():
    """Count the calls of each of `HOST_READS` on any tensor in the body."""
    calls: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            calls[name] += 1
            return originals[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextmanager
def count_module_walks(module: nn.Module):
    """Count the walks over `module`'s submodules (`named_modules`, which `modules`, `named_parameters` and
    diffusers' `set_adapter`, `disable_adapters` and `dtype` all go through) in the body."""
    calls = Counter()
    original = nn.Module.named_modules

    def named_modules(self, *args, **kwargs):
        if self is module:
            calls["walks"] += 1
        return original(self, *args, **kwargs)

    nn.Module.named_modules = named_modules
    try:
        yield calls
    finally:
        nn.Module.named_modules = original


def test_transformer_dtype_is_read_without_a_walk_and_follows_casts(shapes_pipe, monkeypatch):
    adapter = get_adapter(copy.deepcopy(shapes_pipe))
    walks = Counter()
    dtype_of = diffusers.models.modeling_utils.get_parameter_dtype
    monkeypatch.setattr(diffusers.models.modeling_utils, "get_parameter_dtype",
                        lambda module: walks.update(["dtype"]) or dtype_of(module))
    latents = torch.randn(2, *adapter.latent_shape(32, 32))
    cond = adapter.encode_prompts(["a red circle", "two squares"])
    with torch.no_grad():
        for _ in range(3):
            adapter.predict(adapter.transformer, latents, torch.tensor([0.7, 0.4]), cond)
    assert walks["dtype"] == 0  # diffusers' `transformer.dtype` walks every module on each read
    assert adapter.transformer_dtype == torch.float32
    adapter.transformer.to(torch.bfloat16)
    assert adapter.transformer_dtype == adapter.transformer.dtype == torch.bfloat16
    adapter.pipe.transformer = copy.deepcopy(shapes_pipe.transformer)  # a replaced transformer is found again
    assert adapter.transformer_dtype == torch.float32


def test_policy_switches_walk_no_module_and_keep_only_the_trained_adapter_trainable(shapes_pipe, tmp_path):
    adapter = get_adapter(copy.deepcopy(shapes_pipe))
    policies = Policies(adapter, ("old",), tiny_lora(), owner="TestTrainer")
    transformer = policies.transformer
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".old." in name and "lora_B" in name:
                param.add_(0.1)
    x = torch.randn(2, *adapter.latent_shape(32, 32))
    sigma, cond = torch.tensor([0.7, 0.4]), adapter.encode_prompts(["a red circle", "two squares"])

    def velocity(module):
        return adapter.predict(module, x, sigma, cond)

    with torch.no_grad():
        trained_velocity = velocity(transformer)
        with count_module_walks(transformer) as walks:
            policies.activate("default")  # already active: no work
            with policies.policy("old") as old:
                old_velocity = velocity(old)
            with policies.policy("ref") as ref:
                ref_velocity = velocity(ref)
        assert walks["walks"] == 0
        transformer.set_adapter("old")  # diffusers' own switches give the same velocities
        assert torch.equal(old_velocity, velocity(transformer))
        transformer.disable_adapters()
        assert torch.equal(ref_velocity, velocity(transformer))
        transformer.enable_adapters()
        policies.activate("default")  # the adapter diffusers activated behind its back is noticed
        assert torch.equal(trained_velocity, velocity(transformer))
    assert not torch.equal(old_velocity, trained_velocity)
    assert {n for n, p in transformer.named_parameters() if p.requires_grad} == trainable

    # an adapter loaded later is indexed too: it computes, and stays frozen after switching to it and back
    policies.save_weights(str(tmp_path), type(adapter.pipe))
    policies.load_adapter(tmp_path, "anchor", purpose="the test")
    with torch.no_grad(), policies.policy("anchor") as anchor:
        assert torch.equal(velocity(anchor), trained_velocity)
    assert {n for n, p in transformer.named_parameters() if p.requires_grad} == trainable
    assert set(policies._parameters("anchor")) == {n.replace(".default.", ".anchor.") for n in trainable}
    with pytest.raises(ValueError, match=r"No adapter 'missing' on the transformer; its adapters are \['default'"):
        policies.activate("missing")


def test_rollout_reads_the_device_once(shapes_pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with count_host_reads() as reads:
        out = rollout(lambda x, s: -x * s.view(-1, 1, 1, 1), x, sigma_grid(6, shift=3.0), step_type="flow_sde",
                      noise_level=0.7, sde_steps=[0, 2, 3], generator=g)
    assert dict(reads) == {"tolist": 1}  # the grid, checked once; no per-step check reads the device
    assert out.log_probs.shape == (2, 3) and torch.isfinite(out.log_probs).all()
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout(lambda x, s: x, x, torch.tensor([1.0, 0.5, 0.6, 0.0]))


def test_to_floats_reads_each_device_once_and_matches_item():
    values = [torch.tensor(0.1), 0.25, torch.tensor(1 / 3, dtype=torch.float64), torch.tensor(True), 2]
    expected = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    with count_host_reads() as reads:
        floats = to_floats(values)
    assert floats == expected and all(type(a) is type(b) or isinstance(b, bool) for a, b in zip(floats, expected))
    assert dict(reads) == {"tolist": 1}


LOSS_TRAINERS = {
    "nft": (FlowNFTTrainer, FlowNFTConfig, {}),  # beta = 1e-4: the reference KL and velocity_norm_ratio
    "grpo": (DanceGRPOTrainer, DanceGRPOConfig, {"beta": 0.01}),  # the SDE-mean KL
    "awm": (FlowAWMTrainer, FlowAWMConfig, {"norm_guard_coef": 0.01}),  # the EMA KL and NormGuard
    "dpo": (FlowDPOTrainer, FlowDPOConfig, {}),
}


@pytest.mark.parametrize("algorithm", list(LOSS_TRAINERS))
def test_a_loss_chunk_never_reads_the_device_and_log_reads_the_metrics(shapes_pipe, tmp_path, algorithm):
    trainer_class, config_class, overrides = LOSS_TRAINERS[algorithm]
    args = config_class(output_dir=str(tmp_path), **{**TINY_RUN, "num_inference_steps": 3, **overrides})
    trainer = trainer_class(copy.deepcopy(shapes_pipe), args=args, reward_funcs="shapes",
                            train_dataset=train_prompts(4), peft_config=tiny_lora())
    trainer.model.train()
    inputs = trainer._prepare_inputs(list(train_prompts(4)))
    trainer._metrics["train"].clear()
    getattr(trainer, "_sigma_max", None)  # the SDE trainers read their grid's sigma_max once per trainer
    with count_host_reads() as reads:
        loss = trainer._compute_loss(trainer.model, inputs, 0)
        loss.backward()
    assert dict(reads) == {}
    queued = {k: [float(v) for v in values] for k, values in trainer._metrics["train"].items()}
    assert "velocity_norm_ratio" in queued
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert {k: logged[k] for k in queued} == {k: sum(v) / len(v) for k, v in queued.items()}
