"""benchmarks/throughput.py and benchmarks/architectures.py: the real-size architectures build with the real widths
and shapes, and one tiny measured iteration reports every phase, adding up to at most the iteration."""

import json
import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import architectures  # noqa: E402
import throughput  # noqa: E402

from flow_trl.models import get_adapter  # noqa: E402


def test_full_depth_parameter_counts_match_the_published_configs():
    for name in architectures.ARCHITECTURES:
        assert architectures.count_parameters(name) == architectures.EXPECTED_TRANSFORMER_PARAMETERS[name]
        assert architectures.count_parameters(name, buffers=True) == architectures.EXPECTED_TRANSFORMER_BUFFERS[name]
    # SD3.5-Medium's published 2.5B includes its positional-embedding buffer; FLUX.1-dev's 12B is all parameters
    assert 2.45e9 < architectures.count_parameters("sd35-medium") + architectures.count_parameters(
        "sd35-medium", buffers=True) < 2.5e9
    assert 11.8e9 < architectures.count_parameters("flux-dev") < 12e9


@pytest.mark.parametrize("name, text_tokens, pooled, guidance",
                         [("sd35-medium", 77 + 256, 2048, 1.0), ("flux-dev", 512, 768, 3.5)])
def test_reduced_architecture_gives_the_transformer_its_real_input_shapes(name, text_tokens, pooled, guidance):
    pipe = architectures.build_pipeline(name, num_layers=1, num_attention_heads=2, torch_dtype=torch.bfloat16)
    config = pipe.transformer.config
    assert config.num_layers == 1 and config.joint_attention_dim == 4096 and config.pooled_projection_dim == pooled
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.config.latent_channels == 16
    adapter = get_adapter(pipe)
    cond = adapter.encode_prompts(["a photo of a red circle"])
    assert cond["prompt_embeds"].shape == (1, text_tokens, 4096)
    assert cond["pooled_projections"].shape == (1, pooled)
    latents = adapter.initial_noise(1, 64, 64, torch.Generator().manual_seed(0), torch.bfloat16)
    with torch.no_grad():
        v = adapter.velocity(pipe.transformer, latents, torch.tensor([0.5]), cond, guidance)  # FLUX: embedded
    assert v.shape == latents.shape and torch.isfinite(v.float()).all()


def test_a_reduced_sd35_keeps_dual_attention_only_in_existing_blocks():
    config = architectures.transformer_config("sd35-medium", num_layers=3)
    assert config["dual_attention_layers"] == (0, 1, 2)
    with pytest.raises(ValueError, match="flux-dev only"):
        architectures.transformer_config("sd35-medium", num_single_layers=2)
    with pytest.raises(ValueError, match="Unknown architecture"):
        architectures.transformer_config("sdxl")


def test_one_tiny_nft_iteration_reports_every_phase_within_the_iteration(tmp_path):
    args = throughput.parse_args([
        "--trainer", "nft", "--prompts", "2", "--group", "2", "--steps", "2", "--lora_rank", "4",
        "--warmup", "0", "--iterations", "1", "--output_json", str(tmp_path / "out.json"),
    ])
    results = throughput.measure(args)
    phases = results["phases_mean_seconds"]
    assert list(phases) == list(throughput.PHASES)
    iteration = results["seconds_per_iteration"]["median"]
    assert all(seconds > 0 for seconds in phases.values()), phases
    assert sum(seconds for name, seconds in phases.items() if name != "rest") <= iteration
    assert phases["rest"] == pytest.approx(iteration - sum(v for k, v in phases.items() if k != "rest"))
    # 2 rollout steps, then 1 trained sigma (int(2 x 0.99)): the trained, old-policy and reference (beta) forwards
    assert results["pure_compute_calls_per_iteration"] == {"forward": 5, "backward": 1}
    assert results["pure_compute_seconds_per_iteration"] > 0 and results["overhead_ratio"] > 0
    assert 0 < results["startup_seconds"]["train_setup"] < results["startup_seconds"]["to_first_iteration"]
    assert results["peak_memory_kind"] == "cpu_peak_rss" and results["peak_memory_mib"] > 100
    assert "s/iter median" in throughput.report(results)
    json.dumps(results, default=str)
