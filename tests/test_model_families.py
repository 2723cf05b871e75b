"""FLUX.1, FLUX.2-klein and Qwen-Image adapters on tiny offline pipelines: our rollout reproduces each pipeline's own
`__call__`, the sigma grids are the pipelines', the PPO ratio starts at 1, every trainer takes an optimisation step on
every family, and a FLUX LoRA loads with `FluxPipeline.load_lora_weights`.

The pipelines are real diffusers/transformers classes with tiny configs and random weights; tokenizers are word-level
`tokenizers` models (the shapes world's for CLIP/T5, a chat-style one for the Qwen text encoders) built offline.
"""

import copy
import math

import pytest
import torch
from datasets import Dataset
from helpers import redness, tiny_config, tiny_lora

import flow_trl.trainer as trainers
from flow_trl.models import ADAPTERS, FluxAdapter, get_adapter
from flow_trl.sampling import rollout, sigma_grid
from flow_trl.toy.pipeline import EOS_ID, PAD_ID, build_tokenizer, vocabulary


RESOLUTION = 16  # every tiny VAE halves the size once: 8x8 latents, 4x4 = 16 tokens
MAX_LEN = 16
FAMILIES = ("flux", "flux2_klein", "qwen_image")
GUIDANCE = {"flux": 3.5, "flux2_klein": 4.0, "qwen_image": 4.0}  # the pipelines' own defaults
PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


# ---- tiny offline pipelines ----------------------------------------------------------------------------------------

CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
# the words of QwenImagePipeline's prompt template, so that its 34 template tokens are dropped as in the real model
TEMPLATE_WORDS = (
    "system Describe the image by detailing the color , shape , size , texture , quantity , text , spatial "
    "relationships of the objects and background : user assistant"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_tokenizer():
    """Word-level tokenizer with Qwen's chat special tokens and newlines as tokens, plus a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = dict.fromkeys([*TEMPLATE_WORDS, "\n", *vocabulary()[4:]])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*CHAT_SPECIALS, *words])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|[^\w\s]+"), behavior="isolated"),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=64,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def dynamic_scheduler(**overrides):
    """FlowMatchEulerDiscreteScheduler with FLUX's resolution-dependent shift settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        **overrides,
    )


# two resolution levels: the VAE halves the image size once; 4 latent channels
TINY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 8),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def tiny_flux(guidance_embeds: bool = True):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    n = len(build_tokenizer())
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LEN,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            projection_dim=32,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=n,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
    )
    vae = AutoencoderKL(**TINY_VAE, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = FluxTransformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    return FluxPipeline(
        scheduler=dynamic_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=build_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=build_tokenizer(),
        transformer=transformer,
    )


def tiny_flux2_klein():
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = build_chat_tokenizer()
    # 27 layers: the pipeline stacks the hidden states of layers 9, 18 and 27
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    vae = AutoencoderKLFlux2(**TINY_VAE)
    with torch.no_grad():  # non-trivial batch-norm statistics, so the latent normalisation is exercised
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    return Flux2KleinPipeline(
        scheduler=dynamic_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def tiny_qwen_image():
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = build_chat_tokenizer()
    n = len(tokenizer)
    transformer = QwenImageTransformer2DModel(
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.8, 1.0, 2.0],
    )
    text_config = {
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "vocab_size": n,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    }
    vision_config = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=text_config,
            vision_config=vision_config,
            hidden_size=16,
            vocab_size=n,
            vision_start_token_id=n - 3,
            vision_end_token_id=n - 2,
            vision_token_id=n - 1,
        )
    )
    # Qwen-Image's scheduler also stretches the grid to end at shift_terminal
    return QwenImagePipeline(
        scheduler=dynamic_scheduler(shift_terminal=0.02),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


BUILDERS = {"flux": tiny_flux, "flux2_klein": tiny_flux2_klein, "qwen_image": tiny_qwen_image}


@pytest.fixture(scope="module")
def pipes():
    """One tiny pipeline per family, built once; tests that mutate a pipeline (trainers add LoRA) deep-copy it."""
    built = {}
    for name, build in BUILDERS.items():
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()  # constructors leave dropout on; from_pretrained would not
        built[name] = pipe
    return built


def pipeline_call(pipe, family, prompts, steps, seed, **kwargs):
    """`pipe(...)` with the family's guidance knob set to the reference value (Qwen-Image: true CFG vs "")."""
    g = GUIDANCE[family]
    guidance = (
        dict(negative_prompt=[""] * len(prompts), true_cfg_scale=g)
        if family == "qwen_image"
        else dict(guidance_scale=g)
    )
    return pipe(
        prompt=prompts,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        max_sequence_length=MAX_LEN,
        generator=torch.Generator().manual_seed(seed),
        **guidance,
        **kwargs,
    )


# ---- adapters against the pipelines --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ode_rollout_reproduces_the_pipeline_call(pipes, family):
    pipe = pipes[family]
    adapter = get_adapter(pipe, MAX_LEN)
    steps, g = 4, GUIDANCE[family]
    expected = pipeline_call(pipe, family, PROMPTS, steps, seed=7, output_type="pt").images
    pipeline_sigmas = pipe.scheduler.sigmas.clone()

    cond, negative = adapter.encode_prompts(PROMPTS), adapter.encode_prompts([""])
    noise = adapter.initial_noise(
        len(PROMPTS), RESOLUTION, RESOLUTION, torch.Generator().manual_seed(7), torch.float32
    )
    grid = adapter.sigma_grid(steps, RESOLUTION, RESOLUTION)
    with torch.no_grad():
        out = rollout(lambda x, s: adapter.velocity(adapter.transformer, x, s, cond, g, negative), noise, grid)
        images = adapter.decode(out.latents)

    torch.testing.assert_close(grid, pipeline_sigmas, atol=0, rtol=0)  # the very grid the pipeline sampled on
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and expected.std() > 0.01
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)  # measured: <= 6e-7


@pytest.mark.parametrize("family", FAMILIES)
def test_sigma_grid_is_the_dynamic_shift_of_the_image_sequence_length(pipes, family):
    adapter = get_adapter(pipes[family], MAX_LEN)
    seq, steps = (RESOLUTION // 4) ** 2, 6
    if family == "flux2_klein":  # compute_empirical_mu, below its 4300-token branch: linear in the step count
        m_200, m_10 = 0.00016927 * seq + 0.45666666, 8.73809524e-05 * seq + 1.89833333
        mu = m_200 + (m_200 - m_10) / 190.0 * (steps - 200)
    else:  # calculate_shift: linear in the sequence length between (256, 0.5) and (4096, 1.15)
        mu = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)
    assert adapter.mu(RESOLUTION, RESOLUTION, steps) == pytest.approx(mu, rel=1e-6)
    assert adapter.sigma_shift(RESOLUTION, RESOLUTION, steps) == pytest.approx(math.exp(mu), rel=1e-6)
    grid = adapter.sigma_grid(steps, RESOLUTION, RESOLUTION)
    static = sigma_grid(steps, math.exp(mu))  # exp(mu) / (exp(mu) + 1/t - 1) is the static shift exp(mu)
    if family == "qwen_image":  # shift_terminal = 0.02 stretches 1 - sigma so that the last sigma is 0.02
        stretch = (1 - static[-2]) / (1 - 0.02)
        static = torch.cat([1 - (1 - static[:-1]) / stretch, torch.zeros(1)])
        assert grid[-2].item() == pytest.approx(0.02, abs=1e-6)
    torch.testing.assert_close(grid, static, atol=1e-6, rtol=0)
    # twice the resolution: four times the tokens, a larger mu, more time spent at high noise
    assert adapter.sigma_shift(2 * RESOLUTION, 2 * RESOLUTION, steps) > adapter.sigma_shift(
        RESOLUTION, RESOLUTION, steps
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_pack_and_encode_in_the_pipeline_layout(pipes, family):
    adapter = get_adapter(pipes[family], MAX_LEN)
    assert adapter.latent_shape(RESOLUTION, RESOLUTION) == (16, 16)  # 4x4 tokens of 2x2 patches of 4 channels
    noise = adapter.initial_noise(3, RESOLUTION, RESOLUTION, torch.Generator().manual_seed(0), torch.float32)
    assert noise.shape == (3, 16, 16)
    drawn = torch.randn(adapter.noise_shape(3, RESOLUTION, RESOLUTION), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adapter.unpack(noise).flatten(), drawn.flatten(), atol=0, rtol=0)  # same draws
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    latents = adapter.encode_images(images)
    assert latents.shape == (2, 16, 16)
    torch.testing.assert_close(adapter.pack(adapter.unpack(latents)), latents, atol=0, rtol=0)
    decoded = adapter.decode(latents)
    assert decoded.shape == images.shape and 0 <= decoded.min() and decoded.max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter.latent_shape(18, 18)
    with pytest.raises(ValueError, match="positive multiples of 4"):  # -16 % 4 == 0, but no image is -16 px tall
        adapter.latent_shape(-16, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_splits_the_batch_without_changing_images_or_gradients(pipes, family):
    latents = get_adapter(pipes[family], MAX_LEN).initial_noise(
        5, RESOLUTION, RESOLUTION, torch.Generator().manual_seed(3), torch.float32
    )
    whole, split = get_adapter(pipes[family], MAX_LEN, None), get_adapter(pipes[family], MAX_LEN, decode_batch_size=2)
    calls = []
    hook = pipes[family].vae.decoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        torch.testing.assert_close(split.decode(latents), whole.decode(latents), atol=1e-6, rtol=0)
        assert calls == [2, 2, 1, 5]  # three VAE calls of at most 2 latents, then one of all 5
        grads = []
        for adapter in (split, whole):
            x = latents.clone().requires_grad_()
            (adapter.decode(x, requires_grad=True) * torch.linspace(0, 1, 3)[:, None, None]).sum().backward()
            grads.append(x.grad)
        assert grads[0].abs().sum(dim=tuple(range(1, latents.dim()))).min() > 0  # every chunk's latents get one
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="decode_batch_size must be at least 1"):
        get_adapter(pipes[family], MAX_LEN, decode_batch_size=0)


def test_flux_guidance_is_embedded_not_cfg(pipes):
    adapter = get_adapter(pipes["flux"], MAX_LEN)
    cond = adapter.encode_prompts(PROMPTS)
    x = adapter.initial_noise(2, RESOLUTION, RESOLUTION, torch.Generator().manual_seed(0), torch.float32)
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        guided = adapter.velocity(adapter.transformer, x, sigma, cond, guidance_scale=3.5)
        torch.testing.assert_close(guided, adapter.predict(adapter.transformer, x, sigma, cond, guidance=3.5))
        assert (guided - adapter.predict(adapter.transformer, x, sigma, cond, guidance=1.0)).abs().max() > 1e-4
    schnell = get_adapter(tiny_flux(guidance_embeds=False), MAX_LEN)  # no guidance embedding: the value is ignored
    with torch.no_grad():
        torch.testing.assert_close(
            schnell.velocity(schnell.transformer, x, sigma, cond, 3.5),
            schnell.velocity(schnell.transformer, x, sigma, cond, 1.0),
        )


def test_distilled_flux2_klein_ignores_the_guidance_scale(pipes):
    pipe = copy.deepcopy(pipes["flux2_klein"])
    adapter = get_adapter(pipe, MAX_LEN)
    cond, negative = adapter.encode_prompts(PROMPTS), adapter.encode_prompts([""])
    x = adapter.initial_noise(2, RESOLUTION, RESOLUTION, torch.Generator().manual_seed(0), torch.float32)
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        plain = adapter.predict(adapter.transformer, x, sigma, cond)
        assert (adapter.velocity(adapter.transformer, x, sigma, cond, 4.0, negative) - plain).abs().max() > 1e-4
        pipe.register_to_config(is_distilled=True)
        torch.testing.assert_close(adapter.velocity(adapter.transformer, x, sigma, cond, 4.0, negative), plain)


def test_qwen_image_cfg_is_rescaled_to_the_conditional_norm_per_token(pipes):
    adapter = get_adapter(pipes["qwen_image"], MAX_LEN)
    v_cond = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # token norms 5 and 1
    v_uncond = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    # CFG with g = 2: 2 v_c - v_u = [[5, 7], [2, -1]], then rescaled to norms 5 and 1
    expected = torch.tensor([[[5.0, 7.0], [2.0, -1.0]]])
    expected = expected * torch.tensor([[[5.0], [1.0]]]) / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(adapter.combine_guidance(v_uncond, v_cond, 2.0), expected)


def test_qwen_image_prompts_are_padded_to_one_length_with_a_mask(pipes):
    adapter = get_adapter(pipes["qwen_image"], MAX_LEN)
    cond = adapter.encode_prompts(["a photo of a red circle", ""])
    assert cond["prompt_embeds"].shape[:2] == (2, MAX_LEN) and cond["prompt_embeds_mask"].shape == (2, MAX_LEN)
    # 6 prompt words + <|im_end|> \n <|im_start|> assistant \n after the 34 dropped template tokens; "" keeps 5
    assert cond["prompt_embeds_mask"].sum(dim=1).tolist() == [11, 5]
    assert cond["prompt_embeds"][1, 5:].abs().max() == 0


@pytest.mark.parametrize(
    "adapter_cls", [a for a in ADAPTERS if a.pipeline_class_names != ("StableDiffusion3Pipeline",)]
)
def test_default_lora_targets_exist_in_the_family(pipes, adapter_cls):
    family = {"FluxPipeline": "flux", "Flux2KleinPipeline": "flux2_klein", "QwenImagePipeline": "qwen_image"}[
        adapter_cls.pipeline_class_names[0]
    ]
    linear = [n for n, m in pipes[family].transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in adapter_cls.default_lora_target_modules:
        assert any(n.endswith("." + target) for n in linear), target


def test_unsupported_pipeline_fails_naming_the_supported_ones():
    class StableDiffusionXLPipeline:
        pass

    with pytest.raises(ValueError, match="StableDiffusionXLPipeline is not supported") as error:
        get_adapter(StableDiffusionXLPipeline())
    for name in ("FluxPipeline", "Flux2KleinPipeline", "QwenImagePipeline", "StableDiffusion3Pipeline"):
        assert name in str(error.value)


# ---- trainers on every family --------------------------------------------------------------------------------------


COMMON = dict(num_inference_steps=3, learning_rate=1e-2, resolution=RESOLUTION, max_sequence_length=MAX_LEN)
TRAINERS = {  # trainer -> (config class, settings of a one-step run); every FlowRLTrainer subclass must be here
    "FlowNFTTrainer": (trainers.FlowNFTConfig, dict(timestep_fraction=0.5)),
    "FlowAWMTrainer": (trainers.FlowAWMConfig, dict(num_train_timesteps=1, timestep_sampler="logit_normal")),
    "FlowDPOTrainer": (trainers.FlowDPOConfig, dict(num_train_timesteps=1)),
    "DanceGRPOTrainer": (trainers.DanceGRPOConfig, dict(timestep_fraction=1.0)),
    "FlowOPDTrainer": (trainers.FlowOPDConfig, dict(timestep_fraction=1.0)),  # + a teacher LoRA of the family
}


def make_trainer(pipes, family, name, tmp_path, **overrides):
    config_cls, settings = TRAINERS[name]
    settings = {**COMMON, "guidance_scale": GUIDANCE[family], **settings, **overrides}
    args = tiny_config(config_cls, tmp_path / name, **settings)
    dataset = Dataset.from_dict({"prompt": ["a red circle", "a blue square", "two green triangles", "a red square"]})
    kwargs = {}
    if name == "FlowOPDTrainer":  # one task; its teacher: a LoRA trained for one NFT step on this family
        teacher_dir = tmp_path / "teacher"
        teacher = make_trainer(pipes, family, "FlowNFTTrainer", tmp_path / "teacher_run", seed=1)
        teacher.train()
        teacher.save_model(str(teacher_dir))
        dataset = dataset.add_column("task", ["t"] * len(dataset))
        kwargs["teachers"] = {"t": str(teacher_dir)}
    return getattr(trainers, name)(
        copy.deepcopy(pipes[family]),
        args=args,
        reward_funcs=[redness],
        train_dataset=dataset,
        peft_config=tiny_lora(),
        **kwargs,
    )


# trainers that cannot run on these families, and why
NOT_IN_MATRIX = {
    "StepGRPOTrainer": "its step scorer (flow_trl.drm.DiffusionRewardModel) is built from SD3 transformer blocks only",
}


def test_the_matrix_covers_every_exported_trainer():
    exported = {
        n
        for n in trainers.__all__
        if isinstance(getattr(trainers, n), type)
        and issubclass(getattr(trainers, n), trainers.FlowRLTrainer)
        and n != "FlowRLTrainer"
    }
    listed = set(TRAINERS) | set(NOT_IN_MATRIX)
    assert exported == listed, f"add {exported - listed} to TRAINERS (or NOT_IN_MATRIX, with the reason)"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_one_optimisation_step_of_every_trainer_on_every_family(pipes, family, name, tmp_path):
    trainer = make_trainer(pipes, family, name, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()}
    trainer.train()
    after = dict(trainer.transformer.named_parameters())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 1 and math.isfinite(losses[0])
    # the image stream's query LoRA of the first double block is always on the gradient path
    first = [n for n in before if n.startswith("transformer_blocks.0.attn.to_q.lora_B.default")]
    assert first and all(not torch.equal(before[n], after[n]) for n in first)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n), "a base weight changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_first_replay_has_ratio_one(pipes, family, tmp_path):
    trainer = make_trainer(pipes, family, "DanceGRPOTrainer", tmp_path, sde_type="flow_sde", noise_level=0.7)
    inputs = trainer._generate_and_score([{"prompt": p} for p in ("a red circle",) * 2 + ("a blue square",) * 2])
    for chunk in range(trainer._num_loss_chunks(inputs)):
        trainer._compute_loss(trainer.model, inputs, chunk)
    ratios = trainer._metrics["train"]["ratio"]
    assert len(ratios) == 2 and all(abs(r - 1) < 1e-5 for r in ratios)


def test_flux_lora_loads_with_flux_pipeline_load_lora_weights(pipes, tmp_path):
    trainer = make_trainer(pipes, "flux", "FlowNFTTrainer", tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    kwargs = dict(output_type="pt")
    expected = pipeline_call(trainer.pipe, "flux", PROMPTS[:1], 3, seed=0, **kwargs).images
    fresh = copy.deepcopy(pipes["flux"])
    base = pipeline_call(fresh, "flux", PROMPTS[:1], 3, seed=0, **kwargs).images
    fresh.load_lora_weights(str(tmp_path / "adapter"))
    assert isinstance(get_adapter(fresh), FluxAdapter)
    assert sum("lora_" in n for n, _ in fresh.transformer.named_parameters()) > 0, "no LoRA layer was loaded"
    loaded = pipeline_call(fresh, "flux", PROMPTS[:1], 3, seed=0, **kwargs).images
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the output ...
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)  # ... exactly as in the trainer
