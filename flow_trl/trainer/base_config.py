"""`FlowRLConfig`: the `TrainingArguments` shared by every flow_trl trainer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from transformers import TrainingArguments
from transformers.utils import logging

from ..advantages import SHAPINGS, SLAS_ORDERS
from ..rewards import check_reward_weights
from ..sampling import STEP_TYPES, check_noise_level
from .validation import check_choice, check_non_negative, check_positive


logger = logging.get_logger(__name__)


SCALE_REWARDS = ("group", "batch", "none")


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, MPS, XPU...): the default of `dataloader_pin_memory`."""
    return torch.accelerator.is_available()


SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def check_engine_has_accelerator(use_cpu: bool) -> None:
    """Refuse an FSDP or DeepSpeed launch that would run on CPU processes.

    accelerate only shards with FSDP or DeepSpeed on accelerators: on CPU processes (`use_cpu`, or no accelerator)
    it falls back to DDP (gloo) without a word, so every process would hold the whole model and optimizer.
    """
    if not use_cpu and accelerator_available():
        return
    for variable, engine in SHARDING_ENGINES.items():
        if parse_flag_from_env(variable):
            raise ValueError(
                f"accelerate was launched with {engine} ({variable}=true), but this run has no accelerator "
                f"({'use_cpu=True' if use_cpu else 'torch sees no GPU'}); accelerate does not shard on CPU processes "
                "and would silently train with DDP instead. Run on GPUs, or launch CPU processes with "
                "`accelerate launch --multi_gpu --num_processes N` (DDP)."
            )


FULL_FINETUNE_PARAMS = ("all", "linear")


@dataclass
class NormGuardArguments:
    r"""
    The NormGuard field, on the configs of trainers that include [`NormGuardMixin`] (NFT, AWM, DPO). A config without
    it refuses `norm_guard_coef` when it is built; to add NormGuard to another trainer, compose both:
    `class MyTrainer(NormGuardMixin, DanceGRPOTrainer)` with `@dataclass class MyConfig(NormGuardArguments,
    DanceGRPOConfig)`.

    norm_guard_coef (`float`, defaults to `0.0`):
        Coefficient of the NormGuard hinge on velocity norms above the reference's (docs/algorithms.md#normguard).
        Above 0 it needs one reference forward per trained timestep (shared with `beta`'s KL); 0 disables it and
        skips that forward.
    """

    norm_guard_coef: float = field(
        default=0.0,
        metadata={"help": "NormGuard hinge coefficient on velocity norms above the reference's; > 0 adds one "
                  "reference forward per trained timestep (shared with beta's KL)."},
    )


@dataclass
class ManifoldAnchorArguments:
    r"""
    The Manifold Anchor Regularization fields, on the configs of trainers that include [`ManifoldAnchorMixin`]
    (Flow-OPD); compose them as for [`NormGuardArguments`].

    mar_coef (`float`, defaults to `0.0`):
        Coefficient of the KL of the policy to a task-agnostic anchor at every trained step, in the trainer's KL form
        (SDE-mean for SDE trainers, velocity otherwise; docs/algorithms.md#mar). Above 0 it adds one anchor forward
        per trained step (with the base model as anchor, the reference forward, shared with `beta`'s KL). 0 disables
        it.
    mar_adapter (`str`, *optional*):
        The anchor: a diffusers-format LoRA (folder, file or Hub id) on the same base; unset: the base model.
    """

    mar_coef: float = field(
        default=0.0,
        metadata={"help": "Manifold Anchor Regularization: KL coefficient to the anchor (0: off; > 0 adds one anchor "
                  "forward per trained step)."},
    )
    mar_adapter: str | None = field(
        default=None, metadata={"help": "MAR anchor LoRA (folder, file or Hub id); unset: the base model."}
    )


REGULARIZER_COEFFICIENTS = ("norm_guard_coef", "mar_coef")


@dataclass
class FlowRLConfig(TrainingArguments):
    r"""
    Configuration shared by all flow_trl trainers (a [`~transformers.TrainingArguments`] subclass).

    > Parameters that control the model

    model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
        Keyword arguments for `DiffusionPipeline.from_pretrained` when `model` is an id or path (e.g.
        `{"dtype": "bfloat16"}`).
    max_sequence_length (`int`, *optional*):
        Token length of the long text encoder (T5 for SD3). Defaults to `min(256, tokenizer max length)`.
    decode_batch_size (`int`, *optional*, defaults to `16`):
        Latents the VAE decodes per call (rollouts, evaluation, samples). Results do not depend on it; smaller
        batches need less memory, and on CPU 16 decodes about twice as fast as 64 at once. `None`: the whole batch.
    full_finetune_params (`str`, defaults to `"all"`):
        Full fine-tuning only (no `peft_config`): `"all"` trains every parameter of the transformer, `"linear"` only
        the weights of its linear layers (biases, norms and the patch embedding stay frozen), which is what a LoRA
        can carry, so that `lora_export_rank` can publish the result as one.
    lora_export_rank (`int`, *optional*):
        Full fine-tuning with `full_finetune_params="linear"` only: `save_model` (and every checkpoint) also writes the
        trained transformer's difference from the base model as a diffusers-format LoRA of this rank
        (`pytorch_lora_weights.safetensors`, which `pipe.load_lora_weights` reads; `flow_trl.lora.
        lora_from_weight_difference`). Exact when the rank reaches every linear layer's smaller dimension (128 for
        the shapes model), the best approximation of that rank below it.
    disable_dropout (`bool`, defaults to `False`):
        Set every dropout probability of the trained transformer (LoRA's `lora_dropout` included) to 0. Rollouts
        always sample in eval mode; with dropout left on, the training forward differs from the one that sampled,
        which biases likelihood ratios. On by default in the likelihood-ratio trainers (GRPO family, OPD, AWM), as in
        TRL's `GRPOConfig`.

    > Parameters that control memory (each one off by default; none changes results)

    offload_text_encoders (`bool`, defaults to `False`):
        Keep the text encoders on the CPU and move them to the accelerator only while they encode (each rollout's
        prompts, each evaluation batch), as diffusers' `enable_model_cpu_offload` does around a pipeline call. Frees
        their accelerator memory for training (SD3.5: CLIP-L, CLIP-G and T5-XXL, about 11 GB in bf16) for one
        host-device copy of their weights per encoding. Nothing to free on a CPU-only run.
    cache_prompt_embeddings (`bool`, defaults to `False`):
        Encode every distinct prompt of `train_dataset` and `eval_dataset` once when the trainer is built, keep the
        embeddings on the CPU, and release the text encoders (the pipeline's text encoder attributes become `None`,
        so their memory is freed unless something else holds them). Rollouts and evaluation look prompts up
        instead of encoding them; a prompt outside those datasets is refused. Costs host memory per prompt (SD3
        with `max_sequence_length=256`: 333 x 4096 values, 2.7 MB in bf16), so it suits prompt sets of up to a few
        thousand; for larger ones use `offload_text_encoders`. Exclusive with `offload_text_encoders`.
    offload_vae (`bool`, defaults to `False`):
        Keep the VAE on the CPU and move it to the accelerator only while it decodes (each rollout, evaluation and
        sample grid). Frees its memory (SD3.5 and FLUX.1: about 0.2 GB in bf16, plus its cached kernels) for one
        copy per decode.
    offload_reward_models (`bool`, defaults to `False`):
        Keep the reward models (the `torch.nn.Module`s of `flow_trl.rewards.RewardModel` reward functions, see
        `RewardModel.modules`) on the CPU and move each to its `device` only while it scores. Loads them when the
        trainer is built. Refused when no reward function holds such a module (plain functions and remote rewards
        have nothing to move).

    > Parameters that control generation (rollouts)

    num_generations (`int`, defaults to `8`):
        Images per prompt (the group size). Must be at least 2 and divide `generation_batch_size`.
    generation_batch_size (`int`, *optional*):
        Images generated per rollout across all processes. Defaults to
        `per_device_train_batch_size * num_processes * steps_per_generation`. Set at most one of this and
        `steps_per_generation`.
    steps_per_generation (`int`, *optional*):
        Micro-batches served from one rollout. Defaults to `gradient_accumulation_steps`.
    num_iterations (`int`, defaults to `1`):
        Passes over each rollout (PPO's mu).
    resolution (`int`, *optional*):
        Image height and width in pixels. Defaults to the pipeline's native resolution.
    num_inference_steps (`int`, defaults to `10`):
        Sampling steps of a rollout (and of evaluation).
    guidance_scale (`float`, defaults to `1.0`):
        Classifier-free guidance scale in rollouts, training forwards and evaluation (`1.0` = no CFG, the default of
        every flow_trl trainer; Flow-GRPO samples SD3.5 with 4.5). Any other value doubles the batch of every
        transformer forward (conditional and unconditional halves).
    sde_type (`str`, defaults to `"ode"`):
        Step function of rollouts, one of `flow_trl.sampling.STEP_TYPES`: `"ode"` (Euler), `"flow_sde"` (Flow-GRPO),
        `"dance_sde"` (DanceGRPO) or `"cps"` (coefficients-preserving). The GRPO family needs a stochastic one.
    noise_level (`float`, defaults to `0.7`):
        Noise level (eta) of the stochastic step functions; ignored by `"ode"`. Valid: `0 < eta` for `"flow_sde"`
        and `"dance_sde"`, `0 < eta <= 1` for `"cps"` (`flow_trl.sampling.NOISE_LEVEL_RANGES`).

    > Parameters that control rewards and advantages

    reward_weights (`list[float]`, *optional*):
        One weight per reward function; all ones by default. Finite, and not all 0.
    scale_rewards (`str`, defaults to `"group"`):
        Advantage normalisation: `(r - group mean) / (std + 1e-4)` with the group's std (`"group"`), the std of the
        whole rollout (`"batch"`, flow_grpo's `global_std`), or no division (`"none"`).
    advantage_shaping (`str`, defaults to `"none"`):
        `"slas"`: Super-Linear Advantage Shaping (docs/algorithms.md#slas): `delta r = r - group mean`, batch-level std
        normalisation (whatever `scale_rewards` says), then `sign(A) |A|^(1 + slas_gamma)`. See docs/grpo.md.
    slas_gamma (`float`, defaults to `1.0`):
        SLAS exponent gamma >= 0 (0: batch-std advantages, no shaping). The paper does not state its value.
    slas_order (`str`, defaults to `"normalize_then_shape"`):
        `"normalize_then_shape"` (gamma acts in batch-std units) or `"shape_then_normalize"`.
    advantage_clip (`float`, *optional*, defaults to `5.0`):
        Clip advantages to `[-advantage_clip, advantage_clip]` (after shaping); `None` disables clipping.

    > Parameters that control regularization and diagnostics

    beta (`float`, defaults to `0.0`):
        Coefficient of the velocity-space KL to the reference model (the base model: LoRA adapters disabled).
        Above 0 it adds one reference forward (no backward) per trained timestep; 0 adds none.
    diagnostics_every_log (`bool`, defaults to `True`):
        On logging steps, run the reference forward even when no loss term needs it, to log
        `velocity_norm_ratio` (the norm-inflation diagnostic). Costs one reference forward (no backward) per trained
        timestep on those steps only, and nothing when a KL or regularizer runs the reference anyway.

    > Parameters that control evaluation and logging

    eval_seed (`int`, defaults to `0`):
        Seed of evaluation noise: prompt `i` of the eval dataset always gets seed `eval_seed + i`.
    eval_num_inference_steps (`list[int]`, *optional*):
        Also evaluate with each of these ODE step counts (e.g. `[28, 4]`), logged as `eval_reward@<steps>`: few-step
        robustness, the NormGuard paper's Table 4.
    num_images_to_log (`int`, defaults to `16`):
        Evaluation samples saved as a grid (under `output_dir/samples/` and to image-capable loggers); `0` disables.
    weight_ema_decay (`float`, defaults to `0.0`):
        Keep an exponential moving average of the trained weights (`ema <- d ema + (1 - d) theta` after optimizer
        steps, `d = min((1 + k) / (10 + k), weight_ema_decay)` at 0-based step `k`), evaluate with it, and end
        training with it in the model, so that `save_model`, the model card and `push_to_hub` publish the average.
        Checkpoints keep the trained weights and the average apart, so resuming continues both. Not a policy: no
        loss uses it. The references evaluate with 0.9 (Diffusion-NFT, every step; flow_grpo, every 8 steps) and
        0.99 (AWM). `0` disables it.
    weight_ema_update_interval (`int`, defaults to `1`):
        Optimizer steps between EMA updates.

    > Parameters that control the output directory

    overwrite_output_dir (`bool`, defaults to `False`):
        Start a new run in an `output_dir` that holds another run's outputs (checkpoints, weights, model card:
        `flow_trl.trainer.outputs.previous_run_files`) by deleting those outputs first; other files are kept. When
        `False`, `train()` refuses such a folder unless it resumes (`resume_from_checkpoint`), so two runs never mix.

    > [!NOTE]
    > Launched with several processes (`WORLD_SIZE > 1`) on a machine without accelerators, `use_cpu` is switched
    > on, so `accelerate launch --multi_gpu --num_processes 2 ...` trains on 2 CPU processes (see
    > docs/distributed.md).
    > Defaults that differ from `TrainingArguments`: `learning_rate=3e-4`, `weight_decay=1e-4`, `logging_steps=10`,
    > `remove_unused_columns=False` (extra dataset columns reach the reward functions), `dataloader_pin_memory` only
    > when an accelerator exists (torch warns on every CPU run otherwise), `gradient_checkpointing`
    > is applied with diffusers' `enable_gradient_checkpointing`. Precision follows `bf16`/`fp16` only (fp32 on CPU).
    """

    # Parameters whose default values differ from TrainingArguments
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate (LoRA-sized default)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: extra columns are passed to reward functions."}
    )
    dataloader_pin_memory: bool = field(
        default_factory=accelerator_available,
        metadata={"help": "Pin dataloader memory; by default only when there is an accelerator to copy to."},
    )

    # model
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `DiffusionPipeline.from_pretrained`."}
    )
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Token length of the long text encoder (T5 for SD3); min(256, max) if unset."}
    )
    decode_batch_size: int | None = field(
        default=16, metadata={"help": "Latents the VAE decodes per call (None: the whole batch at once)."}
    )
    full_finetune_params: str = field(
        default="all",
        metadata={"help": "Full fine-tuning only: 'all' trains every transformer parameter, 'linear' only the "
                  "weights of its linear layers (what a LoRA can carry, see lora_export_rank)."},
    )
    lora_export_rank: int | None = field(
        default=None,
        metadata={"help": "Full fine-tuning with full_finetune_params='linear': also save the change of the linear "
                  "weights as a diffusers-format LoRA of this rank (exact at each layer's smaller dimension)."},
    )
    disable_dropout: bool = field(
        default=False,
        metadata={"help": "Set every dropout probability of the trained transformer (lora_dropout included) to 0, so "
                  "the training forward matches the sampling one (on in the likelihood-ratio trainers)."},
    )

    # memory
    offload_text_encoders: bool = field(
        default=False,
        metadata={"help": "Keep the text encoders on the CPU, moving them to the accelerator only to encode prompts "
                  "(frees their memory; one host-device copy per encoding)."},
    )
    cache_prompt_embeddings: bool = field(
        default=False,
        metadata={"help": "Encode every prompt of train_dataset and eval_dataset once, keep the embeddings on the CPU "
                  "and release the text encoders (other prompts are refused). Exclusive with "
                  "offload_text_encoders."},
    )
    offload_vae: bool = field(
        default=False,
        metadata={"help": "Keep the VAE on the CPU, moving it to the accelerator only to decode."},
    )
    offload_reward_models: bool = field(
        default=False,
        metadata={"help": "Keep RewardModel reward functions' torch modules on the CPU, moving each to its device "
                  "only to score (loaded when the trainer is built)."},
    )

    # generation
    num_generations: int = field(default=8, metadata={"help": "Images per prompt (group size), at least 2."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Images per rollout across processes (exclusive with steps_per_generation)."}
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches served from one rollout; gradient_accumulation_steps if unset."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout (PPO's mu)."})
    resolution: int | None = field(default=None, metadata={"help": "Image size in pixels; the pipeline's if unset."})
    num_inference_steps: int = field(default=10, metadata={"help": "Sampling steps of rollouts and evaluation."})
    guidance_scale: float = field(
        default=1.0,
        metadata={"help": "CFG scale in rollouts, training and evaluation (1.0: no CFG; any other value doubles "
                  "every forward's batch)."},
    )
    sde_type: str = field(
        default="ode", metadata={"help": "Rollout step function: 'ode', 'flow_sde', 'dance_sde' or 'cps'."}
    )
    noise_level: float = field(
        default=0.7, metadata={"help": "Noise level (eta) of stochastic step functions: > 0; at most 1 for 'cps'."}
    )

    # rewards and advantages
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One finite weight per reward function, not all 0 (all ones if unset)."}
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Advantage std: 'group', 'batch' (global std) or 'none'."}
    )
    advantage_shaping: str = field(
        default="none", metadata={"help": "'slas' (batch std, then sign(A)|A|^(1+slas_gamma)) or 'none'."}
    )
    slas_gamma: float = field(default=1.0, metadata={"help": "SLAS exponent gamma >= 0."})
    slas_order: str = field(
        default="normalize_then_shape",
        metadata={"help": "SLAS order: 'normalize_then_shape' or 'shape_then_normalize'."},
    )
    advantage_clip: float | None = field(
        default=5.0, metadata={"help": "Clip advantages to +-this value (after shaping); None disables clipping."}
    )

    # regularization and diagnostics
    beta: float = field(
        default=0.0,
        metadata={"help": "Velocity KL coefficient to the reference (base) model; > 0 adds one reference forward per "
                  "trained timestep."},
    )
    diagnostics_every_log: bool = field(
        default=True,
        metadata={"help": "Run the reference forward on logging steps to log velocity_norm_ratio (one forward per "
                  "trained timestep on those steps only)."},
    )

    # evaluation and logging
    eval_seed: int = field(default=0, metadata={"help": "Eval prompt i always uses seed eval_seed + i."})
    eval_num_inference_steps: list[int] | None = field(
        default=None, metadata={"help": "Extra ODE step counts to evaluate with (logged as eval_reward@<steps>)."}
    )
    num_images_to_log: int = field(default=16, metadata={"help": "Eval samples saved as an image grid; 0 disables."})
    weight_ema_decay: float = field(
        default=0.0,
        metadata={"help": "Decay of a weight EMA that is evaluated and saved (NFT: 0.9); 0: off. Warmed up as "
                  "min((1 + k) / (10 + k), decay) at step k: over 250 steps every decay from 0.966 up averages "
                  "alike."},
    )
    weight_ema_update_interval: int = field(default=1, metadata={"help": "Optimizer steps between EMA updates."})

    # output directory
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete another run's outputs (checkpoints, weights, model card) in output_dir before "
                  "training; without it (and without resume_from_checkpoint) such a folder is refused."},
    )

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    def __post_init__(self):
        check_engine_has_accelerator(self.use_cpu)
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # `accelerate launch --multi_gpu --num_processes N` on a machine without accelerators: train on CPU
            # processes (gloo) instead of N copies of a single-process run
            self.use_cpu = True
        super().__post_init__()
        if self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size=True would shrink batches and split prompt groups. Set it to False and lower "
                "`per_device_train_batch_size` instead."
            )
        num_processes = self.world_size
        per_step = self.per_device_train_batch_size * num_processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set at most one of `generation_batch_size` and `steps_per_generation`.")
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        elif self.generation_batch_size % per_step:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                f"per_device_train_batch_size * num_processes ({self.per_device_train_batch_size} * "
                f"{num_processes} = {per_step})."
            )
        else:
            self.steps_per_generation = self.generation_batch_size // per_step
        self._check_generation_groups()
        if self.reward_weights is not None:
            check_reward_weights(self.reward_weights)
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_choice("advantage_shaping", self.advantage_shaping, SHAPINGS)
        check_choice("slas_order", self.slas_order, SLAS_ORDERS)
        check_non_negative("slas_gamma", self.slas_gamma)
        check_choice("sde_type", self.sde_type, STEP_TYPES)
        check_noise_level(self.sde_type, self.noise_level)
        if self.num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be at least 2; got {self.num_inference_steps}.")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(
                f"resolution must be a positive number of pixels (the side of the square images); got "
                f"{self.resolution}. Leave it unset for the pipeline's native resolution."
            )
        for name in ("noise_level", "beta", *REGULARIZER_COEFFICIENTS):
            if hasattr(self, name):  # the regularizer fields exist on the configs of trainers that apply them
                check_non_negative(name, getattr(self, name))
        check_positive("guidance_scale", self.guidance_scale)
        check_positive("advantage_clip", self.advantage_clip, optional=True)
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1; got {self.num_iterations}.")
        check_choice("full_finetune_params", self.full_finetune_params, FULL_FINETUNE_PARAMS)
        if self.cache_prompt_embeddings and self.offload_text_encoders:
            raise ValueError(
                "cache_prompt_embeddings releases the text encoders, so offload_text_encoders has nothing to move. "
                "Set one of them: cache_prompt_embeddings for a fixed prompt set, offload_text_encoders otherwise."
            )
        if self.lora_export_rank is not None:
            if self.lora_export_rank < 1:
                raise ValueError(f"lora_export_rank must be at least 1 (or None); got {self.lora_export_rank}.")
            if self.full_finetune_params != "linear":
                raise ValueError(
                    "lora_export_rank exports the change of the linear weights; with full_finetune_params="
                    f"{self.full_finetune_params!r} biases and norms change too and a LoRA cannot carry them. Set "
                    "full_finetune_params='linear'."
                )
        if not 0 <= self.weight_ema_decay < 1:
            raise ValueError(f"weight_ema_decay must be in [0, 1) (0: no EMA); got {self.weight_ema_decay}.")
        if self.weight_ema_update_interval < 1:
            raise ValueError(f"weight_ema_update_interval must be >= 1; got {self.weight_ema_update_interval}.")
        micro_steps = self.steps_per_generation * self.num_iterations  # micro-batches served by one rollout
        if self.save_strategy == "steps" and self.save_steps >= 1:
            if (int(self.save_steps) * self.gradient_accumulation_steps) % micro_steps:
                logger.warning(
                    f"save_steps ({self.save_steps}) x gradient_accumulation_steps is not a multiple of "
                    f"steps_per_generation x num_iterations ({micro_steps}): checkpoints fall inside a rollout, and a "
                    "run resumed from one generates a fresh rollout instead of the rest of the old one, so it will "
                    "not match an uninterrupted run exactly. Pick save_steps on a rollout boundary for exact resume."
                )

    def _check_generation_groups(self) -> None:
        """Group geometry: `num_generations >= 2` and the generation batch made of whole groups."""
        num_processes = self.world_size
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be at least 2 (group-relative advantages); got {self.num_generations}."
            )
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"The generation batch ({self.generation_batch_size} images = per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x {num_processes} processes x steps_per_generation "
                f"{self.steps_per_generation}) must be divisible by num_generations ({self.num_generations}). "
                "Change per_device_train_batch_size, steps_per_generation or num_generations."
            )
