"""The shipped shapes pipeline: offline loading, real diffusers classes, deterministic generation, real skill."""

import argparse

import pytest
import torch

from flow_trl.toy import evaluate_pipeline, generate, load_shapes_pipeline, score_batch, split_prompts
from flow_trl.toy.pipeline import EOS_ID, SHAPES_PIPELINE_DIR, build_tokenizer, build_untrained_pipeline
from flow_trl.toy.pretrain import learning_rate


def test_components_are_the_real_sd3_classes(shapes_pipe):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(shapes_pipe, StableDiffusion3Pipeline)
    assert isinstance(shapes_pipe.transformer, SD3Transformer2DModel)
    assert isinstance(shapes_pipe.vae, AutoencoderKL)
    assert isinstance(shapes_pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(shapes_pipe.text_encoder_3, T5EncoderModel)
    # shift and scale come from pretraining the VAE, not the library defaults
    assert shapes_pipe.vae.config.scaling_factor != 1.0
    untrained = build_untrained_pipeline()
    assert shapes_pipe.transformer.config.qk_norm == untrained.transformer.config.qk_norm == "rms_norm"


def test_tokenizer_is_word_level_with_a_distinct_end_token(shapes_pipe):
    tok = build_tokenizer()
    ids = tok("a photo of a red circle").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == EOS_ID and len(ids) == 8
    assert EOS_ID != 2  # CLIP's legacy pooling rule would otherwise pool from the highest token id
    assert shapes_pipe.text_encoder.config.eos_token_id == EOS_ID
    assert tok.unk_token_id not in ids
    assert shapes_pipe.tokenizer("a red circle").input_ids == ids[:2] + ids[5:]


def test_shipped_pipeline_is_small():
    size = sum(f.stat().st_size for f in SHAPES_PIPELINE_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20


def test_prompts_condition_the_model(shapes_pipe):
    embeds, _, pooled, _ = shapes_pipe.encode_prompt(
        ["a photo of a red circle", "a photo of a blue square"], None, None, do_classifier_free_guidance=False,
        max_sequence_length=16,
    )
    assert embeds.shape == (2, 32, 64) and pooled.shape == (2, 64)
    assert not torch.allclose(embeds[0], embeds[1])


def test_generation_is_deterministic_and_in_range(shapes_pipe):
    prompts, seeds = ["a photo of a red circle", "a photo of two squares"], [1, 2]
    a = generate(shapes_pipe, prompts, seeds, num_inference_steps=4)
    b = generate(shapes_pipe, prompts, seeds, num_inference_steps=4)
    assert a.shape == (2, 3, 64, 64)
    assert torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a[0], generate(shapes_pipe, prompts[:1], [3], num_inference_steps=4)[0])


def test_pretrained_pipeline_draws_what_it_is_asked_and_untrained_does_not(shapes_pipe):
    rows = [r for r in split_prompts("test") if r["tag"] in ("single_object", "colors")] * 2
    prompts, seeds = [r["prompt"] for r in rows], list(range(len(rows)))
    images = generate(shapes_pipe, prompts, seeds)
    trained = sum(score_batch(images, rows)["score"]) / len(rows)
    shifted = rows[1:] + rows[:1]  # the same images judged against a neighbour's prompt
    assert trained > 0.3 and trained > sum(score_batch(images, shifted)["score"]) / len(rows) + 0.1
    untrained_pipe = build_untrained_pipeline(seed=0)
    untrained_pipe.set_progress_bar_config(disable=True)
    untrained = score_batch(generate(untrained_pipe, prompts, seeds), rows)
    assert sum(untrained["score"]) / len(rows) < 0.1


def test_evaluate_pipeline_reports_every_family_and_writes_a_grid(shapes_pipe, tmp_path):
    metrics = evaluate_pipeline(shapes_pipe, num_per_family=2, num_inference_steps=4, grid_path=tmp_path / "g.png")
    for key in ("score", "strict", "quality", "score/position", "strict/color_attr"):
        assert 0.0 <= metrics[key] <= 1.0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[1] >= 6 * 64  # one row per family


def test_pretraining_schedule_warms_up_holds_then_decays_to_zero():
    args = argparse.Namespace(lr=4e-3, warmup_steps=200, transformer_steps=3000, lr_schedule="wsd", decay_fraction=0.3)
    lrs = [learning_rate(step, args) for step in range(3000)]
    assert lrs[0] == pytest.approx(4e-3 / 200) and lrs[199] == pytest.approx(4e-3)
    assert lrs[2100] == pytest.approx(4e-3)  # the decay starts after 70% of the steps...
    assert lrs[2550] == pytest.approx(2e-3)  # ...halfway down at 85%...
    assert lrs[2999] == pytest.approx(4e-3 / 900)  # ...and its last step is the smallest
    assert all(a >= b for a, b in zip(lrs[2100:], lrs[2101:]))
    args.lr_schedule = "constant"
    assert learning_rate(2999, args) == pytest.approx(4e-3)


def test_load_shapes_pipeline_explains_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="flow_trl.toy.pretrain"):
        load_shapes_pipeline(tmp_path)


def test_evaluation_samples_on_the_trainers_grid(shapes_pipe):
    """`generate` hands the pipeline sigmas that its scheduler shifts once, onto `sampling.sigma_grid`."""
    from flow_trl.sampling import sigma_grid
    from flow_trl.toy import sigma_schedule

    shift = shapes_pipe.scheduler.config.shift
    assert shift != 1.0  # otherwise a double shift could not show
    generate(shapes_pipe, ["a photo of a red circle"], [0], num_inference_steps=6)
    torch.testing.assert_close(shapes_pipe.scheduler.sigmas, sigma_grid(6, shift), atol=1e-6, rtol=0)
    assert sigma_schedule(4) == [1.0, 0.75, 0.5, 0.25]
