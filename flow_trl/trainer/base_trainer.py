"""`FlowRLTrainer`: the `transformers.Trainer` every flow_trl algorithm subclasses.

One iteration: prompts (each repeated `num_generations` times, groups kept together across processes) -> rollout
with the sampling policy -> images -> reward functions -> weighted reward -> group advantages -> buffered slices,
each trained by the algorithm's loss over its timesteps (+ regularizers) -> optimizer step through the Trainer.

An algorithm subclass sets a few class attributes (`config_class`, `_name`, `_policy_adapters`, `_sampling_policy`)
and implements `_compute_loss` (and `_num_loss_chunks` unless it trains on forward-process `train_sigmas`).
Everything else (rollouts, rewards, advantages, buffering, LoRA and policy copies, saving in diffusers format,
resume, evaluation, metrics) lives here.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, set_seed

from ..advantages import advantage_stats, clip_advantages, group_advantages, reward_stats, slas_advantages
from ..lora import lora_adapter_metadata, lora_from_weight_difference, with_default_targets
from ..models import get_adapter, index_conditioning, load_pipeline
from ..regularizers import velocity_kl, velocity_norm_ratio
from ..rewards import compute_rewards, resolve_reward_funcs, reward_func_names, weighted_reward
from ..sampling import rollout
from .base_config import FlowRLConfig
from .callbacks import use_diffusers_callbacks
from .ema import ParameterEMA
from .health import RewardHealth, ZeroGradientCallback
from .model_card import ModelCardMixin
from .outputs import prepare_output_dir, remove_stale_weights
from .utils import disable_dropout, eval_mode, soft_update_decay


POLICY_STATE_FILE = "flow_trl_policies.safetensors"
ALGORITHM_STATE_FILE = "flow_trl_state.json"  # what an algorithm adapts during training (e.g. SLAS gamma)
WEIGHT_EMA_FILE = "flow_trl_weight_ema.safetensors"
TRAINER_RECORD_FILE = "flow_trl_trainer.json"  # which trainer wrote a checkpoint, and its rollout count
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_TRAINER_MARK = "_flow_trl_trainer"  # set on a pipeline's transformer by the trainer that prepared it for training


class RepeatSampler(Sampler[int]):
    """Yield dataset indices so that each prompt's `num_generations` copies stay together, for all processes.

    Unique prompts are drawn ``prompts_per_generation`` at a time from a permutation seeded by ``seed + epoch``;
    each chunk is emitted ``repeat_count`` times (once per micro-batch served from the rollout), each index
    ``num_generations`` times in a row::

        chunk [a, b], G = 2, repeat 2  ->  a a b b | a a b b      (one rollout of 4 images, served twice)

    The process-split dataloader gives each process a contiguous slice, so a gather restores whole groups.
    """

    def __init__(self, num_rows: int, num_generations: int, prompts_per_generation: int, repeat_count: int,
                 seed: int = 0):
        if num_rows < prompts_per_generation:
            raise ValueError(
                f"The training dataset has {num_rows} prompts but one rollout needs {prompts_per_generation} distinct "
                "prompts (generation_batch_size / num_generations). Add prompts or lower generation_batch_size."
            )
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_generation, self.repeat_count = prompts_per_generation, repeat_count
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        n = self.prompts_per_generation
        for start in range(0, self.num_rows - n + 1, n):
            chunk = order[start : start + n].tolist()
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        return (self.num_rows // self.prompts_per_generation) * self.prompts_per_generation * (
            self.num_generations * self.repeat_count
        )


class _WeightEMAUpdate(TrainerCallback):
    """Folds the trained weights into the trainer's `ParameterEMA` after every optimizer step (before logging,
    evaluation and saving, which `Trainer` runs after `on_step_end`)."""

    def __init__(self, ema: ParameterEMA):
        self.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update(state.global_step)


def _identity(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


class FlowRLTrainer(ModelCardMixin, Trainer):
    """Base trainer of flow_trl; use one of its algorithm subclasses (e.g. [`FlowNFTTrainer`]).

    Args:
        model (`str` or `DiffusionPipeline`): a model id or path (loaded with `DiffusionPipeline.from_pretrained`
            and `args.model_init_kwargs`) or a pipeline object. Its transformer is trained.
        args (`FlowRLConfig` subclass, *optional*): the algorithm's config; `<Algo>Config(output_dir=...)` if unset.
        reward_funcs (callable, `str`, or a list of them): see [`flow_trl.rewards`]. Names of built-ins are
            accepted (e.g. `"shapes"`).
        train_dataset (`datasets.Dataset`): prompts in a `prompt` column; every other column reaches the reward
            functions as a keyword argument.
        eval_dataset (`datasets.Dataset`, *optional*): held-out prompts, evaluated with fixed seeds and ODE sampling.
        callbacks (`list[TrainerCallback]`, *optional*), optimizers (`tuple`, *optional*): as in `Trainer`.
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter (recommended). Without it, the whole
            transformer is trained and reference/old policies are full frozen copies.
    """

    config_class: type[FlowRLConfig] = FlowRLConfig
    _tag_names = ["flow-trl", "diffusers", "text-to-image"]
    _name = "FlowRL"
    _paper: dict[str, str] = {}
    _policy_adapters: tuple[str, ...] = ()  # extra named policies the algorithm keeps (e.g. NFT's "old")
    _sampling_policy = "default"  # the policy that generates rollouts
    loss_is_scaled_for_ga = True  # training_step divides by gradient accumulation itself

    def __init__(
        self,
        model,
        args: FlowRLConfig | None = None,
        reward_funcs=None,
        train_dataset=None,
        eval_dataset=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if args is None:
            args = self._default_args(model)
        elif not isinstance(args, self.config_class):
            raise TypeError(
                f"`args` must be a {self.config_class.__name__}, got {type(args).__name__}. flow_trl's signature is "
                f"{type(self).__name__}(model, args=..., reward_funcs=[...], ...): pass reward functions by keyword."
            )
        if train_dataset is not None and "prompt" not in train_dataset.column_names:
            raise ValueError(
                f"The training dataset needs a 'prompt' column; its columns are {train_dataset.column_names}. "
                "Rename your text column with `dataset.rename_column(old, 'prompt')`."
            )
        if eval_dataset is not None and "prompt" not in eval_dataset.column_names:
            raise ValueError(f"The eval dataset needs a 'prompt' column; its columns are {eval_dataset.column_names}.")
        if args.norm_guard_coef > 0 and not any(c.__name__ == "NormGuardMixin" for c in type(self).__mro__):
            raise ValueError(f"{type(self).__name__} does not include NormGuardMixin; set norm_guard_coef=0.")
        if args.mar_coef > 0 and not any(c.__name__ == "ManifoldAnchorMixin" for c in type(self).__mro__):
            raise ValueError(f"{type(self).__name__} does not include ManifoldAnchorMixin; set mar_coef=0.")
        set_seed(args.seed)

        self.pipe = load_pipeline(model, args.model_init_kwargs)
        self.adapter = get_adapter(self.pipe, args.max_sequence_length, args.decode_batch_size)
        needs_rewards = reward_funcs is not None or self._requires_reward_funcs(train_dataset)
        self.reward_funcs = resolve_reward_funcs(reward_funcs) if needs_rewards else []
        self.reward_func_names = reward_func_names(self.reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} values but there are {len(self.reward_funcs)} reward "
                "functions; give one weight per function."
            )
        self.resolution = args.resolution or self.adapter.default_resolution
        try:
            self.adapter.latent_shape(self.resolution, self.resolution)
        except ValueError as error:
            raise ValueError(f"resolution {self.resolution} does not fit this pipeline. {error}") from error

        transformer = self.adapter.transformer
        owner = getattr(transformer, _TRAINER_MARK, None)
        if owner is not None:
            raise ValueError(
                f"This pipeline is already used by a {owner}, which set up its transformer for training (LoRA "
                "adapters or policy copies, frozen parameters); a second trainer would train on top of that. Give "
                "each trainer its own pipeline: load it again, pass the model path, or pass a `copy.deepcopy(pipe)` "
                "made before the first trainer."
            )
        for module in self.adapter.frozen_modules():
            module.requires_grad_(False).eval()
        self.is_lora = peft_config is not None
        self._policy_models: dict[str, nn.Module] = {}
        if self.is_lora:
            if args.full_finetune_params != "all" or args.lora_export_rank is not None:
                raise ValueError(
                    "full_finetune_params and lora_export_rank apply to full fine-tuning; with a peft_config the "
                    "LoRA itself is trained and saved. Drop peft_config, or leave both at their defaults."
                )
            peft_config = with_default_targets(  # e.g. SD3's attention projections
                peft_config, self.adapter.default_lora_target_modules, self.adapter.unused_lora_modules()
            )
            transformer.requires_grad_(False)
            transformer.add_adapter(peft_config, adapter_name="default")
            for name in self._policy_adapters:
                with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    transformer.add_adapter(copy.deepcopy(peft_config), adapter_name=name)
            self._activate("default")
            for name in self._policy_adapters:
                self._copy_adapter("default", name)
        else:
            _set_full_finetune_params(transformer, args.full_finetune_params)
            for name in (*self._policy_adapters, "ref"):
                self._policy_models[name] = copy.deepcopy(transformer).requires_grad_(False).eval()
        setattr(transformer, _TRAINER_MARK, type(self).__name__)
        self._prepared_output_dir: str | None = None  # the output_dir `train` has checked (see `prepare_output_dir`)
        if args.disable_dropout:
            disable_dropout(transformer)
        # diffusers' API, not transformers' activation_checkpointing_enable (`gradient_checkpointing` is the alias
        # transformers < 5.23 knows, `activation_checkpointing` the newer name; both are turned off for `Trainer`)
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            transformer.enable_gradient_checkpointing()
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False

        super().__init__(
            model=transformer,
            args=args,
            data_collator=_identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        use_diffusers_callbacks(self.callback_handler)
        self.add_callback(ZeroGradientCallback())
        self._reward_health = RewardHealth()
        self.weight_ema: ParameterEMA | None = None
        if args.weight_ema_decay > 0:
            self.weight_ema = ParameterEMA(self.transformer, args.weight_ema_decay, args.weight_ema_update_interval)
            self.add_callback(_WeightEMAUpdate(self.weight_ema))
        self.compute_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        for module in self.adapter.frozen_modules():
            module.to(self.accelerator.device)
        for module in self._policy_models.values():
            module.to(self.accelerator.device)
        self.sigmas = self.adapter.sigma_grid(args.num_inference_steps, self.resolution, self.resolution)
        # the static shift the pipeline applies at this resolution, for the trainers' training-timestep draws
        self.sigma_shift = self.adapter.sigma_shift(self.resolution, self.resolution, args.num_inference_steps)
        self._negative_cond = None
        if args.guidance_scale != 1.0 or self.rollout_guidance_scale != 1.0:
            self._negative_cond = self.adapter.encode_prompts([""])
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._buffered_inputs: list[dict[str, Any]] | None = None
        self._num_rollouts = 0
        # (optimizer step, index among that step's rollouts) of the latest rollout: what its randomness is keyed on
        self._rollout_key: tuple[int, int] | None = None
        self._step = 0

    @classmethod
    def _default_args(cls, model) -> FlowRLConfig:
        """The config used when `args` is not given: the algorithm's defaults, output to `<model name>-<algo>`."""
        name = str(model).rstrip("/").split("/")[-1] if isinstance(model, (str, os.PathLike)) else "pipeline"
        return cls.config_class(output_dir=f"{name}-{cls._name}")

    def _requires_reward_funcs(self, train_dataset) -> bool:
        """Whether training needs reward functions (offline preference training does not)."""
        return True

    # ---- policies ----------------------------------------------------------------------------------------------

    @property
    def transformer(self) -> nn.Module:
        """The unwrapped trained module (the pipeline's own transformer; `self.model` may be a DDP wrapper)."""
        return self.adapter.transformer

    def _activate(self, name: str) -> None:
        """Make adapter `name` the active one; only "default" is ever trainable."""
        self.transformer.set_adapter(name)
        for param_name, param in self.transformer.named_parameters():
            if "lora_" in param_name:
                param.requires_grad_(".default." in param_name)

    def _copy_adapter(self, source: str, target: str, decay: float = 0.0) -> None:
        """``target <- decay * target + (1 - decay) * source`` for every LoRA (or full-copy) weight."""
        with torch.no_grad():
            if self.is_lora:
                params = dict(self.transformer.named_parameters())
                for name, param in params.items():
                    if f".{target}." in name:
                        param.lerp_(params[name.replace(f".{target}.", f".{source}.")], 1.0 - decay)
            else:
                src = self.transformer if source == "default" else self._policy_models[source]
                for p_t, p_s in zip(self._policy_models[target].parameters(), src.parameters()):
                    p_t.lerp_(p_s, 1.0 - decay)

    def _soft_update(self, target: str, schedule: str, max_decay: float, metric: str) -> None:
        """Soft-update the lagged policy `target` toward the trained one, with the decay of the current optimizer step.

        Called before each rollout, it acts once per optimizer step: not before the first one, and not before a later
        rollout of the same optimizer step (the trained policy has not moved since, so every rollout of one
        optimizer step samples the same lagged policy, like one epoch of the reference implementations).
        """
        if self.state.global_step == 0 or self._rollout_key is not None and self._rollout_key[1] > 0:
            return
        decay = soft_update_decay(self.state.global_step, schedule, max_decay)
        self._copy_adapter("default", target, decay=decay)
        self._metrics["train"][metric].append(decay)

    @contextmanager
    def policy(self, name: str, model: nn.Module | None = None):
        """Yield the module that computes policy `name`: "default" (trained), "ref" (base), or a named policy.

        `model` is the (possibly DDP-wrapped) module to use for "default"; with LoRA every policy is the same
        module with another adapter active (or adapters disabled for "ref").
        """
        if name == "default":
            yield model if model is not None else self.model
        elif not self.is_lora:
            yield self._policy_models[name]
        elif name == "ref":
            self.transformer.disable_adapters()
            try:
                with eval_mode(self.transformer):  # a frozen policy: no dropout
                    yield self.transformer
            finally:
                self.transformer.enable_adapters()
        else:
            self._activate(name)
            try:
                with eval_mode(self.transformer):
                    yield self.transformer
            finally:
                self._activate("default")

    @property
    def rollout_guidance_scale(self) -> float:
        """The CFG scale rollouts sample with: `guidance_scale`, the one training replays (trainers that learn from
        final images alone may sample with another)."""
        return self.args.guidance_scale

    def velocity(self, module: nn.Module, latents, sigma, cond, guidance_scale: float | None = None) -> torch.Tensor:
        """The guided velocity of `module` with the negative prompt; the CFG scale defaults to `guidance_scale`."""
        scale = self.args.guidance_scale if guidance_scale is None else guidance_scale
        with torch.autocast(self.accelerator.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            return self.adapter.velocity(module, latents, sigma, cond, scale, self._negative_cond).float()

    # ---- data --------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset=None) -> Sampler:
        dataset = dataset if dataset is not None else self.train_dataset
        args = self.args
        return RepeatSampler(
            num_rows=len(dataset),
            num_generations=args.num_generations,
            prompts_per_generation=args.generation_batch_size // args.num_generations,
            repeat_count=args.num_iterations * args.steps_per_generation,
            seed=args.seed,
        )

    def get_train_dataloader(self):
        """Trainer's dataloader, but each batch is one process's share of a whole rollout (the generation batch)."""
        if self.train_dataset is None:
            raise ValueError("Training requires a train_dataset.")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt"]

    # ---- rollouts ----------------------------------------------------------------------------------------------

    def _rollout_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator that depends only on (seed, optimizer step, rollout index within that step, process, salt),
        so rollouts are resumable and the rollouts of one optimizer step draw different noise. The first rollout of
        a step is keyed on (seed, step, process, salt) alone: runs with at most one rollout per optimizer step draw
        what they always drew."""
        step, index = self._rollout_key or (self.state.global_step, 0)
        key = (self.args.seed, step, self.accelerator.process_index, salt) + ((index,) if index else ())
        return torch.Generator().manual_seed(hash(key) % (2**63))

    def encode_prompts(self, prompts: list[str]):
        """Encode each distinct prompt once and index the result back to the batch."""
        unique = list(dict.fromkeys(prompts))
        cond = self.adapter.encode_prompts(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=next(iter(cond.values())).device)
        return index_conditioning(cond, index)

    def _initial_noise(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Initial latents of a rollout: independent standard normal noise per sample."""
        return self.adapter.initial_noise(num_samples, self.resolution, self.resolution, generator, self.compute_dtype)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator, policy: str = "default", step_type="ode",
               batch_size: int | None = None, guidance_scale: float | None = None):
        """Roll out `policy` on `prompts` (CFG scale: `guidance_scale` unless given); returns ``(conditioning,
        Rollout)`` for the whole batch."""
        cond = self.encode_prompts(prompts)
        noise = self._initial_noise(len(prompts), generator)
        batch_size = batch_size or len(prompts)
        chunks = []
        with self.policy(policy) as module, eval_mode(module):  # the policy samples without dropout
            for i in range(0, len(prompts), batch_size):
                sub = index_conditioning(cond, slice(i, i + batch_size))
                chunks.append(rollout(
                    lambda x, s, sub=sub: self.velocity(module, x, s, sub, guidance_scale),
                    noise[i : i + batch_size],
                    self.sigmas.to(noise.device),
                    step_type=step_type,
                    noise_level=self.args.noise_level,
                    generator=generator,
                ))
        return cond, chunks

    def _generate_and_score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Roll out the sampling policy on this process's rows, score, and compute group advantages."""
        args = self.args
        prompts = [row["prompt"] for row in rows]
        generator = self._rollout_generator()
        cond, chunks = self.sample(prompts, generator, self._sampling_policy, args.sde_type,
                                   batch_size=args.per_device_train_batch_size,
                                   guidance_scale=self.rollout_guidance_scale)
        latents = torch.cat([c.latents for c in chunks])
        images = self.adapter.decode(latents)
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        rewards = compute_rewards(self.reward_funcs, prompts, images, columns, trainer_state=self.state)
        all_rewards = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()
        if self.accelerator.is_main_process:
            self._reward_health.check(all_rewards, self.reward_func_names)
        total = weighted_reward(all_rewards, args.reward_weights)
        advantages = self.compute_advantages(total)
        self._log_rollout_metrics(all_rewards, total, advantages)
        inputs = {
            "cond": cond,
            "latents": latents,
            "rewards": self._local_rows(total, len(prompts)).to(latents.device),
            "advantages": self._local_rows(advantages, len(prompts)).to(latents.device),
        }
        if chunks[0].log_probs is not None:
            inputs["latents_before"] = torch.cat([c.latents_before for c in chunks])
            inputs["latents_after"] = torch.cat([c.latents_after for c in chunks])
            inputs["log_probs"] = torch.cat([c.log_probs for c in chunks])
            inputs["step_indices"] = torch.tensor(chunks[0].step_indices).expand(len(prompts), -1)
        return self._prepare_training_inputs(inputs, generator)

    def _local_rows(self, gathered: torch.Tensor, n: int) -> torch.Tensor:
        """This process's rows of a tensor gathered over processes, each of which contributed `n` contiguous rows."""
        start = self.accelerator.process_index * n
        return gathered[start : start + n]

    def compute_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of the gathered rewards `[N]` (whole groups): group-normalised (`scale_rewards`) or SLAS-shaped
        (`advantage_shaping`), then clipped to `advantage_clip`."""
        args = self.args
        if args.advantage_shaping == "slas":
            advantages = slas_advantages(rewards, args.num_generations, args.slas_gamma, args.slas_order)
        else:
            advantages = group_advantages(rewards, args.num_generations, args.scale_rewards)
        return clip_advantages(advantages, args.advantage_clip)

    def _prepare_training_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """The rollout's training inputs: the algorithm adds what it draws once per rollout (e.g. timesteps and
        noise) or regroups samples (e.g. into preference pairs). Tensors whose first dim is the batch size (that
        of ``latents``) are shuffled and cut into micro-batches."""
        return inputs

    def _forward_process_noise(self, latents: torch.Tensor, sigmas: torch.Tensor,
                               generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Training sigmas `[B, k]` and fresh forward-process noise `[B, k, ...]` for them (fp32)."""
        noise = torch.randn((*sigmas.shape, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        return {"train_sigmas": sigmas.to(latents.device), "train_noise": noise.to(latents.device)}

    def _log_rollout_metrics(self, rewards: torch.Tensor, total: torch.Tensor, advantages: torch.Tensor) -> None:
        metrics = self._metrics["train"]
        for j, name in enumerate(self.reward_func_names):
            column = rewards[:, j]
            finite = column[~torch.isnan(column)]
            if len(finite):
                metrics[f"rewards/{name}/mean"].append(finite.mean().item())
                metrics[f"rewards/{name}/std"].append(finite.std(unbiased=False).item())
        for key, value in {**reward_stats(total, self.args.num_generations), **advantage_stats(advantages)}.items():
            metrics[key].append(value)

    def _before_generation(self) -> None:
        """Hook run before each rollout (NFT soft-updates its old policy here)."""

    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Serve one micro-batch; generate a new rollout every `steps_per_generation * num_iterations` calls."""
        args = self.args
        if self._step % (args.steps_per_generation * args.num_iterations) == 0 or self._buffered_inputs is None:
            step = self.state.global_step
            same_step = self._rollout_key is not None and self._rollout_key[0] == step
            self._rollout_key = (step, self._rollout_key[1] + 1 if same_step else 0)
            self._before_generation()
            inputs = self._generate_and_score(generation_batch)
            self._num_rollouts += 1
            order = torch.randperm(len(inputs["latents"]), generator=self._rollout_generator(salt=1))
            self._buffered_inputs = _split(inputs, order, args.steps_per_generation)
        return self._buffered_inputs[self._step % args.steps_per_generation]

    # ---- training ----------------------------------------------------------------------------------------------

    def _num_loss_chunks(self, inputs: dict[str, Any]) -> int:
        """How many backward passes one micro-batch is split into: by default one per training sigma
        (`train_sigmas`, `[B, k]`, as drawn by the forward-process trainers)."""
        if "train_sigmas" not in inputs:
            raise NotImplementedError(f"{type(self).__name__} must implement _num_loss_chunks.")
        return inputs["train_sigmas"].shape[1]

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], chunk: int) -> torch.Tensor:
        """The algorithm's loss for chunk `chunk` of a micro-batch (appends its metrics to `self._metrics`)."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: each loss chunk is back-propagated on its own, so only one chunk's activations live."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        num_chunks = self._num_loss_chunks(inputs)
        total = torch.zeros((), device=self.accelerator.device)
        for chunk in range(num_chunks):
            with self.compute_loss_context_manager():
                loss = self._compute_loss(model, inputs, chunk) / num_chunks
            self.accelerator.backward(loss / self.current_gradient_accumulation_steps)
            total += loss.detach()
        self._step += 1
        return total / self.current_gradient_accumulation_steps

    def _needs_reference(self) -> bool:
        """Whether this step runs the reference forward: for the KL, for a regularizer, or for diagnostics."""
        every = max(1, int(self.args.logging_steps))
        logging_step = (self.state.global_step + 1) % every == 0
        return self.args.beta > 0 or (self.args.diagnostics_every_log and logging_step)

    def _velocity_kl_coef(self) -> float:
        """Coefficient of the velocity-space KL to the reference (`beta`; 0 for an algorithm whose KL has another
        form)."""
        return self.args.beta

    def _velocity_regularization(self, v: torch.Tensor, v_ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """KL to the reference (`beta`) and the norm-inflation diagnostic; mixins add terms via `super()`."""
        metrics = {"velocity_norm_ratio": velocity_norm_ratio(v.detach(), v_ref).mean().item()}
        coef = self._velocity_kl_coef()
        if coef == 0:
            return v.new_zeros(()), metrics
        loss, kl_metrics = velocity_kl(v, v_ref, coef)
        return loss, {**metrics, **kl_metrics}

    def reference_terms(self, latents, sigma, cond, v: torch.Tensor, v_ref: torch.Tensor | None = None,
                        transition=None):
        """Regularization of velocity `v` against the reference at the same inputs (0 when none is needed).

        Pass `v_ref` when the algorithm already computed the reference velocity there, to save the forward. SDE
        trainers also pass their replayed `transition` (a `grpo_trainer.Transition`), which regularizers with an
        SDE-mean form (MAR) use.
        """
        if not self._needs_reference():
            return v.new_zeros(())
        if v_ref is None:
            with torch.no_grad(), self.policy("ref") as ref:
                v_ref = self.velocity(ref, latents, sigma, cond)
        loss, metrics = self._velocity_regularization(v, v_ref)
        self._log_train_metrics(metrics)
        return loss

    def _log_train_metrics(self, metrics: dict[str, float]) -> None:
        """Queue per-step training metrics; `log` averages them over the logging interval."""
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)

    # ---- evaluation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Generate the eval prompts with fixed seeds (ODE, trained policy), score them, log means and a grid.

        With `eval_num_inference_steps`, the same prompts and seeds are also sampled with each of those step counts
        and reported as ``<prefix>_reward@<steps>`` (few-step evaluation).
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (held-out prompts).")
        if not self.reward_funcs:
            raise ValueError("evaluate() scores samples with reward functions; pass `reward_funcs` to the trainer.")
        with eval_mode(self.model):  # logged as eval metrics; training mode is restored afterwards
            rows = list(dataset)
            with self.weight_ema.applied() if self.weight_ema is not None else nullcontext():
                scores, images = self._score_eval_rows(rows, self.sigmas)
                metrics = self._eval_metrics(scores, metric_key_prefix, "")
                for steps in self.args.eval_num_inference_steps or []:
                    grid = self.adapter.sigma_grid(steps, self.resolution, self.resolution)
                    metrics.update(
                        self._eval_metrics(self._score_eval_rows(rows, grid)[0], metric_key_prefix, f"@{steps}")
                    )
            if self.args.num_images_to_log and self.accelerator.is_main_process and images:
                self._save_samples(torch.cat(images)[: self.args.num_images_to_log])
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _score_eval_rows(self, rows: list[dict[str, Any]], sigmas: torch.Tensor):
        """ODE samples of the trained policy on `sigmas` for this process's share of `rows` (seed `eval_seed + i`),
        scored by every reward function: (gathered scores `[N, num_rewards]`, this process's images)."""
        with self.accelerator.split_between_processes(list(range(len(rows)))) as mine:
            scores, images = [], []
            batch = self.args.per_device_eval_batch_size
            for i in range(0, len(mine), batch):
                idx = mine[i : i + batch]
                sub = [rows[k] for k in idx]
                prompts = [r["prompt"] for r in sub]
                imgs = self.sample_with_seeds(self.model, prompts, idx, sigmas)
                columns = {key: [r[key] for r in sub] for key in sub[0] if key != "prompt"}
                scores += compute_rewards(self.reward_funcs, prompts, imgs, columns, trainer_state=self.state).tolist()
                images.append(imgs.cpu())
        return torch.tensor(gather_object(scores), dtype=torch.float32), images

    @torch.no_grad()
    def sample_with_seeds(self, module: nn.Module, prompts: list[str], indices: list[int],
                          sigmas: torch.Tensor) -> torch.Tensor:
        """ODE images of `module` on `sigmas`, image ``i`` from the noise of seed ``eval_seed + indices[i]`` (the
        fixed-seed samples of evaluation and of the model card)."""
        cond = self.encode_prompts(prompts)
        noise = torch.cat([
            self.adapter.initial_noise(1, self.resolution, self.resolution,
                                       torch.Generator().manual_seed(self.args.eval_seed + k), self.compute_dtype)
            for k in indices
        ])
        with eval_mode(module):
            out = rollout(lambda x, s: self.velocity(module, x, s, cond), noise, sigmas.to(noise.device))
        return self.adapter.decode(out.latents)

    def _eval_metrics(self, scores: torch.Tensor, prefix: str, suffix: str) -> dict[str, float]:
        metrics = {}
        for j, name in enumerate(self.reward_func_names):
            metrics[f"{prefix}_rewards/{name}/mean{suffix}"] = scores[:, j].nanmean().item()
        metrics[f"{prefix}_reward{suffix}"] = weighted_reward(scores, self.args.reward_weights).nanmean().item()
        return metrics

    def _save_samples(self, images: torch.Tensor) -> None:
        from ..toy.evaluation import save_image_grid

        path = Path(self.args.output_dir) / "samples" / f"eval_step_{self.state.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(images, path, ncols=min(8, len(images)))
        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)  # TensorBoardCallback
            if writer is not None:
                writer.add_images("eval/samples", images, self.state.global_step)
            wandb = getattr(callback, "_wandb", None)  # WandbCallback
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.log({"eval/samples": wandb.Image(str(path)), "train/global_step": self.state.global_step})

    # ---- logging -----------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()
        if "reward" in metrics:
            for callback in self.callback_handler.callbacks:  # the current reward next to the progress bar
                bar = getattr(callback, "training_bar", None)
                if bar is not None:
                    bar.set_postfix(reward=f"{metrics['reward']:.4f}", refresh=False)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, then an end-of-training summary on the main process (see `training_summary`).

        A new run refuses an `output_dir` that holds another run's outputs, or clears them with
        `overwrite_output_dir` (`flow_trl.trainer.outputs.prepare_output_dir`); resuming, or training again with the
        same trainer, continues the run that is there. With `weight_ema_decay`, the model holds the weight EMA
        afterwards (what `save_model` then writes).
        """
        if self._prepared_output_dir != self.args.output_dir:
            prepare_output_dir(self.args.output_dir, resume=bool(resume_from_checkpoint),
                               overwrite=self.args.overwrite_output_dir, clear=self.args.should_save)
            self._prepared_output_dir = self.args.output_dir
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.weight_ema is not None:
            self.weight_ema.copy_to_module()
        if self.is_world_process_zero() and not self.args.disable_tqdm:
            print(format_training_summary(self.training_summary()))
        return output

    def training_summary(self) -> dict[str, Any]:
        """What the run did: steps, images generated, and the first and last logged value of the reward (total and
        per function), of the evaluation reward and of `velocity_norm_ratio`."""
        history = self.state.log_history
        summary: dict[str, Any] = {
            "algorithm": self._name,
            "steps": self.state.global_step,
            "images_generated": self._num_rollouts * self.args.generation_batch_size,
            "output_dir": self.args.output_dir,
        }
        keys = ["reward", *(f"rewards/{n}/mean" for n in self.reward_func_names), "eval_reward", "velocity_norm_ratio"]
        for key in keys:
            values = [entry[key] for entry in history if key in entry]
            if values:
                summary[key] = (values[0], values[-1])
        runtime = [entry["train_runtime"] for entry in history if "train_runtime" in entry]
        if runtime:
            summary["train_runtime_s"] = runtime[-1]
        return summary

    # ---- saving and resuming -----------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save the trained weights in diffusers format: a LoRA `load_lora_weights` accepts, or the transformer.

        Weights of the other kind that an earlier save left in `output_dir` are removed (`remove_stale_weights`).
        """
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        remove_stale_weights(output_dir, writes_lora=self.is_lora or self.args.lora_export_rank is not None,
                             writes_transformer=not self.is_lora)
        if self.is_lora:
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(self.transformer, adapter_name="default")
            metadata = lora_adapter_metadata(self.transformer.peft_config["default"], lora)
            type(self.pipe).save_lora_weights(
                output_dir, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata
            )
        else:
            self.transformer.save_pretrained(os.path.join(output_dir, "transformer"))
            if self.args.lora_export_rank is not None:
                lora, metadata = lora_from_weight_difference(
                    self.transformer, self._policy_models["ref"], self.args.lora_export_rank
                )
                type(self.pipe).save_lora_weights(
                    output_dir, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata
                )
        torch.save(_without_tokens(self.args), os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, with flow_trl's training state (`_save_training_state`) written first.

        `Trainer` then adds the weights, optimizer and trainer state, pushes the folder (`hub_strategy="checkpoint"`)
        and only then rotates older checkpoints away (`save_total_limit`): every pushed checkpoint is complete, and a
        save that fails leaves the previous checkpoints in place. Its own partial folder is removed, so that
        `resume_from_checkpoint=True` finds the last complete checkpoint.
        """
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        is_new = not os.path.exists(folder)
        try:
            if self.args.should_save:
                self._save_training_state(folder)
            super()._save_checkpoint(model, trial)
        except BaseException:
            if is_new and self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _save_training_state(self, folder: str) -> None:
        """Write what resuming needs beyond `Trainer`'s files into checkpoint `folder`: the trainer record, the extra
        policies, the weight EMA and the algorithm state."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        if self._policy_adapters:
            save_file(self._policy_state(), os.path.join(folder, POLICY_STATE_FILE))
        if self.weight_ema is not None:
            save_file(self.weight_ema.state_dict(), os.path.join(folder, WEIGHT_EMA_FILE))
        algorithm_state = self._algorithm_state()
        if algorithm_state:
            with open(os.path.join(folder, ALGORITHM_STATE_FILE), "w") as f:
                json.dump(algorithm_state, f, indent=1)
        with open(os.path.join(folder, TRAINER_RECORD_FILE), "w") as f:
            json.dump(self._trainer_record(), f, indent=1)

    def _trainer_record(self) -> dict[str, Any]:
        """What a checkpoint must match to resume this trainer (algorithm, LoRA or full fine-tuning, policies), and
        the rollouts generated so far."""
        return {
            "algorithm": self._name,
            "trainer_class": type(self).__name__,
            "lora": self.is_lora,
            "policies": list(self._policy_adapters),
            "num_rollouts": self._num_rollouts,
        }

    def _check_trainer_record(self, checkpoint: str) -> None:
        """Refuse a checkpoint another algorithm, or the other of LoRA and full fine-tuning, wrote; restore the
        rollout count. A checkpoint without a record (older flow_trl) is accepted with a warning."""
        path = os.path.join(checkpoint, TRAINER_RECORD_FILE)
        if not os.path.isfile(path):
            warnings.warn(
                f"{checkpoint} has no {TRAINER_RECORD_FILE} (saved by an older flow_trl), so it cannot be checked to "
                f"come from a {self._name} run; resuming anyway.",
                stacklevel=2,
            )
            return
        with open(path) as f:
            record = json.load(f)
        this = f"{type(self).__name__} ({self._name})"
        if record["algorithm"] != self._name:
            raise ValueError(
                f"{checkpoint} was saved by {record['trainer_class']} ({record['algorithm']}); {this} cannot resume "
                f"it. Resume it with {record['trainer_class']}, or start a new {self._name} run without "
                "resume_from_checkpoint (e.g. from the checkpoint's weights loaded into the pipeline)."
            )
        if record["lora"] != self.is_lora:
            saved, wanted = ("LoRA", "pass the run's peft_config") if record["lora"] else (
                "full fine-tuning", "drop peft_config")
            raise ValueError(f"{checkpoint} was saved by a {saved} run; {this} cannot resume it as it is: {wanted}.")
        self._num_rollouts = record["num_rollouts"]

    def _algorithm_state(self) -> dict[str, Any]:
        """JSON-serialisable values the algorithm adapts while training, saved with each checkpoint (none here)."""
        return {}

    def _restore_algorithm_state(self, state: dict[str, Any]) -> None:
        """Inverse of `_algorithm_state`, called when resuming from a checkpoint that has one."""

    def _policy_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters of the extra policies (`_policy_adapters`), by their name in the checkpoint."""
        if self.is_lora:
            return {n: p for n, p in self.transformer.named_parameters()
                    if any(f".{a}." in n for a in self._policy_adapters)}
        return {f"{a}.{n}": p for a in self._policy_adapters for n, p in self._policy_models[a].named_parameters()}

    def _policy_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().contiguous() for n, p in self._policy_parameters().items()}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load what `_save`/`_save_checkpoint` wrote (diffusers-format weights and the extra policies)."""
        from safetensors.torch import load_file

        self._check_trainer_record(resume_from_checkpoint)
        if self.is_lora:
            from peft.utils import set_peft_model_state_dict

            state = load_file(os.path.join(resume_from_checkpoint, LORA_WEIGHTS_NAME))
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            result = set_peft_model_state_dict(self.transformer, state, adapter_name="default")
            if result.unexpected_keys:
                raise ValueError(f"Checkpoint LoRA has unexpected keys: {result.unexpected_keys[:5]}")
        else:
            from diffusers.models.modeling_utils import load_state_dict

            folder = os.path.join(resume_from_checkpoint, "transformer")
            files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
            state = {}
            for f in files:
                state.update(load_state_dict(os.path.join(folder, f)))
            self.transformer.load_state_dict(state)
        state_file = os.path.join(resume_from_checkpoint, ALGORITHM_STATE_FILE)
        if os.path.isfile(state_file):
            with open(state_file) as f:
                self._restore_algorithm_state(json.load(f))
        if self.weight_ema is not None:
            ema_file = os.path.join(resume_from_checkpoint, WEIGHT_EMA_FILE)
            if not os.path.isfile(ema_file):
                raise FileNotFoundError(
                    f"{ema_file} is missing: the checkpoint was saved without a weight EMA. Resume with "
                    "weight_ema_decay=0, or start a new run to average the weights."
                )
            self.weight_ema.load_state_dict(load_file(ema_file))
        policy_file = os.path.join(resume_from_checkpoint, POLICY_STATE_FILE)
        if self._policy_adapters:
            if not os.path.isfile(policy_file):
                raise FileNotFoundError(f"{policy_file} is missing: this checkpoint cannot resume {self._name}.")
            saved = load_file(policy_file)
            params = self._policy_parameters()
            if saved.keys() != params.keys():
                differing = sorted(saved.keys() ^ params.keys())[:3]
                raise ValueError(
                    f"{policy_file} does not hold the policies {type(self).__name__} keeps ({self._policy_adapters}; "
                    f"e.g. {differing} differ): it was saved by another trainer or LoRA configuration. Resume it with "
                    "the trainer and peft_config that wrote it."
                )
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(saved[name])


def _set_full_finetune_params(transformer: nn.Module, which: str) -> None:
    """Make the parameters `full_finetune_params` names trainable: every one (`"all"`) or the weights of the linear
    layers only (`"linear"`, what `lora_from_weight_difference` can export)."""
    if which == "all":
        transformer.requires_grad_(True)
        return
    transformer.requires_grad_(False)
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            module.weight.requires_grad_(True)


def format_training_summary(summary: dict[str, Any]) -> str:
    """A few readable lines of `FlowRLTrainer.training_summary`."""
    lines = [f"{summary['algorithm']} training finished: {summary['steps']} steps, "
             f"{summary['images_generated']} images generated"
             + (f", {summary['train_runtime_s']:.0f} s" if "train_runtime_s" in summary else "")]
    for key, value in summary.items():
        if isinstance(value, tuple):
            lines.append(f"  {key:<32}{value[0]:>9.4f} -> {value[1]:.4f}  (first -> last logged)")
    lines.append(f"  saved to {summary['output_dir']}/")
    return "\n".join(lines)


def _without_tokens(args: FlowRLConfig) -> FlowRLConfig:
    """A shallow copy of `args` with every `*_token` field cleared, safe to write next to published weights."""
    clean = copy.copy(args)
    for name in vars(args):
        if name.endswith("_token"):
            setattr(clean, name, None)
    return clean


def _split(inputs: dict[str, Any], order: torch.Tensor, num_slices: int) -> list[dict[str, Any]]:
    """Shuffle the batch dimension of every tensor (and conditioning) by `order`, then cut into `num_slices`."""
    n = len(order)
    size = n // num_slices
    slices = []
    for s in range(num_slices):
        idx = order[s * size : (s + 1) * size]
        piece = {}
        for key, value in inputs.items():
            if isinstance(value, dict):
                piece[key] = index_conditioning(value, idx.to(next(iter(value.values())).device))
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                piece[key] = value[idx.to(value.device)]
            else:
                piece[key] = value
        slices.append(piece)
    return slices


__all__ = ["FlowRLTrainer", "RepeatSampler"]
