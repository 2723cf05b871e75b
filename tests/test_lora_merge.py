"""flow_trl.lora: merging diffusers-format LoRAs factor by factor, and loading one as a named adapter."""

import copy
import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from flow_trl.lora import (
    LORA_METADATA_KEY,
    average_lora_deltas,
    load_lora_adapter,
    lora_from_weight_difference,
    lora_shape,
    merge_lora_adapters,
    read_lora,
)
from flow_trl.toy import load_shapes_pipeline


KEYS = ("transformer.blocks.0.to_q.lora_A.weight", "transformer.blocks.0.to_q.lora_B.weight")


def write_lora(folder, rank=2, seed=0, alpha=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {KEYS[0]: torch.randn(rank, 6, generator=g), KEYS[1]: torch.randn(5, rank, generator=g)}
    metadata = {LORA_METADATA_KEY: json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha or rank})}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return tensors


def test_mean_is_the_elementwise_mean_of_the_factors_and_is_saved(tmp_path):
    a, b = write_lora(tmp_path / "a", seed=0), write_lora(tmp_path / "b", seed=1)
    merged = merge_lora_adapters([tmp_path / "a", tmp_path / "b"], output_dir=tmp_path / "m")
    for key in KEYS:
        torch.testing.assert_close(merged[key], (a[key] + b[key]) / 2)
    saved, metadata = read_lora(tmp_path / "m")
    assert set(saved) == set(KEYS) and all(torch.equal(saved[k], merged[k]) for k in KEYS)
    assert json.loads(metadata[LORA_METADATA_KEY])["transformer.r"] == 2  # the first adapter's config
    # factors are averaged, not products: mean(B) @ mean(A) != mean(B @ A) (the cross terms), as docs/opd.md says
    products = (a[KEYS[1]] @ a[KEYS[0]] + b[KEYS[1]] @ b[KEYS[0]]) / 2
    assert not torch.allclose(merged[KEYS[1]] @ merged[KEYS[0]], products)


def test_weighted_and_sum(tmp_path):
    a, b = write_lora(tmp_path / "a", seed=0), write_lora(tmp_path / "b", seed=1)
    weighted = merge_lora_adapters([tmp_path / "a", tmp_path / "b"], weights=[1.0, 3.0], method="weighted")
    summed = merge_lora_adapters([tmp_path / "a", tmp_path / "b"], method="sum")
    for key in KEYS:
        torch.testing.assert_close(weighted[key], 0.25 * a[key] + 0.75 * b[key])
        torch.testing.assert_close(summed[key], a[key] + b[key])


def test_average_of_deltas_is_the_mean_weight_change_at_the_new_scale(tmp_path):
    # two adapters of different ranks and scales (alpha 2 / r 2 = 1, alpha 12 / r 3 = 4)
    a, b = write_lora(tmp_path / "a", rank=2, seed=0), write_lora(tmp_path / "b", rank=3, seed=1, alpha=12)
    mean_delta = (1.0 * a[KEYS[1]] @ a[KEYS[0]] + 4.0 * b[KEYS[1]] @ b[KEYS[0]]) / 2  # rank <= 5 = min(5, 6)
    # rank 5 reaches the layer's smaller dimension: exact, with the student's scale alpha / r = 10 / 5 applied
    exact = average_lora_deltas([tmp_path / "a", tmp_path / "b"], rank=5, lora_alpha=10, output_dir=tmp_path / "s")
    assert exact[KEYS[0]].shape == (5, 6) and exact[KEYS[1]].shape == (5, 5)
    torch.testing.assert_close(2.0 * exact[KEYS[1]] @ exact[KEYS[0]], mean_delta, rtol=1e-5, atol=1e-5)
    saved, metadata = read_lora(tmp_path / "s")  # saved with the new rank and alpha, so it loads at the same scale
    assert all(torch.equal(saved[k], exact[k]) for k in KEYS)
    assert lora_shape(saved, metadata)[:2] == (5, 10.0)
    # rank 1: the best rank-1 approximation (Eckart-Young): the leading singular triple of the mean change
    low = average_lora_deltas([tmp_path / "a", tmp_path / "b"], rank=1, lora_alpha=1)
    u, s, vh = torch.linalg.svd(mean_delta)
    torch.testing.assert_close(low[KEYS[1]] @ low[KEYS[0]], s[0] * u[:, :1] @ vh[:1], rtol=1e-5, atol=1e-5)
    save_file({KEYS[0]: torch.zeros(2, 6), "transformer.other.lora_A.weight": torch.zeros(2, 6)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="same modules"):
        average_lora_deltas([tmp_path / "a", tmp_path / "other.safetensors"], rank=2, lora_alpha=2)


def test_merge_errors(tmp_path):
    write_lora(tmp_path / "a", rank=2)
    write_lora(tmp_path / "r4", rank=4)
    with pytest.raises(ValueError, match="rank or base model"):
        merge_lora_adapters([tmp_path / "a", tmp_path / "r4"])
    save_file({KEYS[0]: torch.zeros(2, 6)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="same modules"):
        merge_lora_adapters([tmp_path / "a", tmp_path / "other.safetensors"])
    with pytest.raises(ValueError, match="weights"):
        merge_lora_adapters([tmp_path / "a", tmp_path / "a"], method="weighted")
    with pytest.raises(ValueError, match="method"):
        merge_lora_adapters([tmp_path / "a"], method="median")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        merge_lora_adapters([tmp_path / "missing"])


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    """A random LoRA (r4, alpha 8, the SD3 attention targets) on the shapes pipeline, saved as flow_trl saves."""
    pipe = load_shapes_pipeline()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.transformer.add_adapter(config)
    from peft.utils import get_peft_model_state_dict

    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("lora")
    type(pipe).save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return folder, config


def transformer_output(transformer):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, transformer.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 4, transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(x, ctx, pooled, torch.tensor([500.0])).sample


def test_named_adapter_matches_diffusers_load_lora_weights(saved_lora):
    folder, config = saved_lora
    reference = load_shapes_pipeline()
    reference.load_lora_weights(folder)
    expected = transformer_output(reference.transformer)

    pipe = load_shapes_pipeline()
    base = transformer_output(pipe.transformer)
    pipe.transformer.add_adapter(config)  # the student's adapter ("default", B = 0)
    load_lora_adapter(pipe.transformer, folder, "teacher")
    assert not any(p.requires_grad for n, p in pipe.transformer.named_parameters() if ".teacher." in n)
    pipe.transformer.set_adapter("teacher")
    torch.testing.assert_close(transformer_output(pipe.transformer), expected)
    assert not torch.allclose(expected, base)  # the LoRA changes the output, so the comparison can fail


def test_named_adapter_errors_on_other_rank_targets_or_alpha(saved_lora):
    folder, config = saved_lora
    for student, message in [
        (LoraConfig(r=8, lora_alpha=8, target_modules=config.target_modules), "rank or base model"),
        (LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"]), "same modules"),
        (LoraConfig(r=4, lora_alpha=4, target_modules=config.target_modules), "lora_alpha"),
    ]:
        pipe = load_shapes_pipeline()
        pipe.transformer.add_adapter(student)
        with pytest.raises(ValueError, match=message):
            load_lora_adapter(pipe.transformer, folder, "teacher")


def _two_layer_models():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 8))
    trained = copy.deepcopy(base)
    with torch.no_grad():
        trained[0].weight.add_(torch.randn(4, 6))  # a full-rank change (rank 4)
    return base, trained


def test_weight_difference_lora_is_exact_at_full_rank_and_the_best_approximation_below():
    base, trained = _two_layer_models()
    delta = trained[0].weight - base[0].weight
    state, config = lora_from_weight_difference(trained, base, rank=5)  # above the layer's rank: zero-padded
    assert set(state) == {"0.lora_A.weight", "0.lora_B.weight"}  # the unchanged layer gets no LoRA
    assert state["0.lora_A.weight"].shape == (5, 6) and state["0.lora_B.weight"].shape == (4, 5)
    assert config["r"] == config["lora_alpha"] == 5 and set(config["target_modules"]) == {"0"}
    torch.testing.assert_close(state["0.lora_B.weight"] @ state["0.lora_A.weight"], delta, atol=1e-5, rtol=0)

    state, _ = lora_from_weight_difference(trained, base, rank=2)
    u, s, vh = torch.linalg.svd(delta.double())
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: the closest rank-2 matrix
    torch.testing.assert_close(state["0.lora_B.weight"] @ state["0.lora_A.weight"], best.float(), atol=1e-5, rtol=0)


def test_weight_difference_lora_refuses_what_a_lora_cannot_carry():
    base, trained = _two_layer_models()
    with torch.no_grad():
        trained[1].weight.add_(1.0)
    with pytest.raises(ValueError, match="only the weights of linear layers"):
        lora_from_weight_difference(trained, base, rank=4)
    with pytest.raises(ValueError, match="no LoRA to export"):
        lora_from_weight_difference(base, copy.deepcopy(base), rank=4)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        lora_from_weight_difference(trained, base, rank=0)
