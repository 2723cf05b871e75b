"""`Policies` (LoRA adapters or frozen full copies behind one API) and the trainers' declared regularizers."""

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig

from flow_trl import DanceGRPOConfig, DanceGRPOTrainer, FlowNFTConfig, FlowNFTTrainer, FlowOPDTrainer
from flow_trl.models import get_adapter
from flow_trl.trainer.base_config import NormGuardArguments
from flow_trl.trainer.mixins import ManifoldAnchorMixin, check_regularizers, supported_regularizers
from flow_trl.trainer.policies import Policies


BACKENDS = ["lora", "full"]


def make_policies(shapes_pipe, backend, names=("old",)):
    adapter = get_adapter(copy.deepcopy(shapes_pipe))
    peft_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian") if backend == "lora" else None
    return adapter, Policies(adapter, names, peft_config, owner="TestTrainer")


def velocity_of(adapter, policies, name):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *adapter.latent_shape(32, 32), generator=g)
    cond = adapter.encode_prompts(["a photo of a red circle", "a photo of two squares"])
    with torch.no_grad(), policies.policy(name) as module:
        return adapter.velocity(module, latents, torch.tensor([0.7, 0.4]), cond)


def trained(policies):
    return {n: p for n, p in policies.transformer.named_parameters() if p.requires_grad}


@torch.no_grad()
def move_trained(policies, amount=0.05):
    for p in trained(policies).values():
        p.add_(amount * torch.randn_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_policy_operation_on_both_backends(shapes_pipe, backend, tmp_path):
    adapter, policies = make_policies(shapes_pipe, backend)
    assert policies.is_lora == (backend == "lora") and policies.names == ("old",)
    base = velocity_of(adapter, policies, "ref")
    initial = velocity_of(adapter, policies, "default")
    # extra policies start as the trained policy; the reference is the base model
    torch.testing.assert_close(velocity_of(adapter, policies, "old"), initial, atol=0, rtol=0)
    move_trained(policies)
    moved = velocity_of(adapter, policies, "default")
    assert not torch.allclose(moved, initial, atol=1e-4)
    torch.testing.assert_close(velocity_of(adapter, policies, "ref"), base, atol=0, rtol=0)
    torch.testing.assert_close(velocity_of(adapter, policies, "old"), initial, atol=0, rtol=0)
    # only the trained policy is trainable, also after switching policies
    names = set(trained(policies))
    assert names
    if backend == "lora":
        assert all("lora_" in n and ".default." in n for n in names)
    # frozen policies run in eval mode; the module's mode is restored afterwards
    policies.transformer.train()
    with policies.policy("old") as module:
        assert not module.training
    assert policies.transformer.training and set(trained(policies)) == names
    # soft update: old <- d old + (1 - d) trained, per weight
    before = policies.state_dict()
    current = {n: p.detach().clone() for n, p in trained(policies).items()}
    policies.soft_update("old", 0.25)
    after = policies.state_dict()
    for key, value in after.items():
        source = key.replace(".old.", ".default.") if backend == "lora" else key.removeprefix("old.")
        torch.testing.assert_close(value, torch.lerp(before[key], current[source], 0.75))
    # copy: old <- trained, which then computes the trained velocity
    policies.copy("default", "old")
    torch.testing.assert_close(velocity_of(adapter, policies, "old"), moved, atol=1e-6, rtol=0)
    # checkpoint state round trip
    saved = policies.state_dict()
    assert saved.keys() == before.keys() and all(k.startswith("old.") for k in saved) == (backend == "full")
    policies.load_state_dict(before)
    loaded = policies.state_dict()
    assert all(torch.equal(loaded[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="file.safetensors does not hold the policies MyTrainer keeps"):
        policies.load_state_dict({"other.weight": torch.zeros(1)}, source="file.safetensors", owner="MyTrainer")
    # trained weights round trip through the diffusers-format files
    policies.save_weights(str(tmp_path), type(shapes_pipe))
    assert (tmp_path / policies.weights_name).exists()
    move_trained(policies)
    policies.load_weights(str(tmp_path))
    torch.testing.assert_close(velocity_of(adapter, policies, "default"), moved, atol=1e-6, rtol=0)


def test_full_copies_are_separate_frozen_modules_and_lora_policies_share_the_transformer(shapes_pipe):
    _, full = make_policies(shapes_pipe, "full")
    with full.policy("old") as old, full.policy("ref") as ref:
        assert old is not full.transformer and ref is not full.transformer and old is not ref
        assert not any(p.requires_grad for p in old.parameters())
    _, lora = make_policies(shapes_pipe, "lora")
    with lora.policy("old") as old:
        assert old is lora.transformer and lora.transformer.active_adapters() == ["old"]
    assert lora.transformer.active_adapters() == ["default"]


def test_load_adapter_needs_lora_and_a_transformer_serves_one_trainer(shapes_pipe):
    adapter, full = make_policies(shapes_pipe, "full")
    with pytest.raises(ValueError, match="mar_adapter is a LoRA on the student's base: pass a peft_config"):
        full.load_adapter("anchor", "mar", purpose="mar_adapter")
    with pytest.raises(ValueError, match="already used by a TestTrainer"):
        Policies(adapter, ("old",), None)


def test_lora_options_of_full_fine_tuning_are_refused(shapes_pipe):
    adapter = get_adapter(copy.deepcopy(shapes_pipe))
    with pytest.raises(ValueError, match="full_finetune_params and lora_export_rank apply to full fine-tuning"):
        Policies(adapter, (), LoraConfig(r=4), lora_export_rank=4)


def test_trainers_declare_their_regularizers():
    class Both(ManifoldAnchorMixin, FlowNFTTrainer):
        pass

    assert supported_regularizers(DanceGRPOTrainer) == ()
    assert supported_regularizers(FlowNFTTrainer) == ("norm_guard_coef",)
    assert supported_regularizers(FlowOPDTrainer) == ("mar_coef",)
    assert set(supported_regularizers(Both)) == {"norm_guard_coef", "mar_coef"}


@dataclasses.dataclass
class NormGuardGRPOConfig(NormGuardArguments, DanceGRPOConfig):
    """A GRPO config composed with the NormGuard field, for a trainer composed with `NormGuardMixin`."""


def test_a_regularizer_is_refused_at_config_time_by_a_config_without_it(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'norm_guard_coef'"):
        DanceGRPOConfig(output_dir=str(tmp_path), norm_guard_coef=0.1, report_to="none")
    with pytest.raises(TypeError, match="unexpected keyword argument 'mar_coef'"):
        FlowNFTConfig(output_dir=str(tmp_path), mar_coef=0.1, report_to="none")
    assert NormGuardGRPOConfig(output_dir=str(tmp_path), norm_guard_coef=0.1, report_to="none").norm_guard_coef == 0.1
    with pytest.raises(ValueError, match="norm_guard_coef must be >= 0"):
        NormGuardGRPOConfig(output_dir=str(tmp_path), norm_guard_coef=-1.0, report_to="none")


def test_a_regularizer_is_refused_before_anything_loads_and_by_class_not_by_name(tmp_path):
    args = NormGuardGRPOConfig(output_dir=str(tmp_path), norm_guard_coef=0.1, report_to="none")
    # the model path does not exist: the config is refused before the pipeline would load
    with pytest.raises(ValueError, match=r"DanceGRPOTrainer does not include NormGuardMixin; set norm_guard_coef=0, "
                                         r"or compose it: .*\(this trainer's regularizers: none\)"):
        DanceGRPOTrainer(str(tmp_path / "no-such-model"), args=args, reward_funcs="shapes")

    class NormGuardMixin:  # an unrelated class that only shares the name does not apply NormGuard
        pass

    class Impostor(NormGuardMixin, DanceGRPOTrainer):
        pass

    with pytest.raises(ValueError, match="Impostor does not include NormGuardMixin"):
        check_regularizers(Impostor, args)
    check_regularizers(DanceGRPOTrainer, DanceGRPOConfig(output_dir=str(tmp_path), report_to="none"))


def test_a_trainer_composed_with_norm_guard_applies_it(tmp_path):
    """The composition docs/trainers.md shows: GRPO + NormGuardMixin with a config composed with its field trains
    and logs the NormGuard term."""
    from helpers import MODEL, tiny_config, tiny_lora, train_prompts

    from flow_trl.trainer.mixins import NormGuardMixin

    class NormGuardGRPOTrainer(NormGuardMixin, DanceGRPOTrainer):
        pass

    args = tiny_config(NormGuardGRPOConfig, tmp_path, norm_guard_coef=1.0, timestep_fraction=1.0)
    trainer = NormGuardGRPOTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(8),
                                   peft_config=tiny_lora())
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "norm_guard/loss" in logged and "norm_guard/active_frac" in logged, sorted(logged)
