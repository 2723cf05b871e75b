"""`FlowRLTrainer`: the `transformers.Trainer` every flow_trl algorithm subclasses.

One iteration: prompts (each repeated `num_generations` times, groups kept together across processes) -> rollout
with the sampling policy -> images -> reward functions -> weighted reward -> group advantages -> buffered slices,
each trained by the algorithm's loss over its timesteps (+ regularizers) -> optimizer step through the Trainer.

An algorithm subclass sets a few class attributes (`config_class`, `_name`, `_policy_adapters`, `_sampling_policy`)
and implements `_compute_loss` (and `_num_loss_chunks` unless it trains on forward-process `train_sigmas`).
Everything else (rollouts, rewards, advantages, buffering, evaluation, metrics) lives here; the policies (LoRA
adapters or frozen copies) are a `Policies` object, saving and resuming come from `CheckpointMixin`, and the rollout
sampler and splitting from `rollout_buffer`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from torch import nn
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import set_seed

from ..advantages import advantage_stats, clip_advantages, group_advantages, reward_stats, slas_advantages
from ..models import Conditioning, cat_conditioning, get_adapter, index_conditioning, load_pipeline
from ..models.base import onloaded
from ..regularizers import velocity_kl, velocity_norm_ratio
from ..rewards import RewardModel, compute_rewards, resolve_reward_funcs, reward_func_names, weighted_reward
from ..sampling import rollout
from .base_config import FlowRLConfig
from .callbacks import use_diffusers_callbacks
from .checkpointing import CheckpointMixin
from .ema import ParameterEMA
from .health import RewardHealth, ZeroGradientCallback
from .mixins import check_regularizers
from .model_card import ModelCardMixin
from .outputs import prepare_output_dir
from .policies import Policies
from .rollout_buffer import RepeatSampler, RolloutCounter, split_rollout
from .utils import eval_mode, soft_update_decay
from .validation import check_datasets, warn_if_never_evaluated


class PromptEmbeddingCache:
    """The conditioning of a fixed prompt set, encoded once and kept on the CPU (`cache_prompt_embeddings`).

    Args:
        encode (`Callable`): prompts -> conditioning (the model adapter's `encode_prompts`).
        prompts (`list[str]`): the distinct prompts to encode.
        batch_size (`int`): prompts encoded per call.
    """

    def __init__(self, encode: Callable[[list[str]], Conditioning], prompts: list[str], batch_size: int):
        self.rows = {prompt: i for i, prompt in enumerate(prompts)}
        self.cond = cat_conditioning([
            {key: value.cpu() for key, value in encode(prompts[i : i + batch_size]).items()}
            for i in range(0, len(prompts), batch_size)
        ])

    def lookup(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The cached conditioning of `prompts` (one row each), on `device`."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            raise ValueError(
                f"No cached embedding for {len(missing)} prompt(s), e.g. {missing[0]!r}: cache_prompt_embeddings "
                "encoded only the prompts of train_dataset and eval_dataset before releasing the text encoders. "
                "Add these prompts to one of those datasets, or set cache_prompt_embeddings=False."
            )
        index = torch.tensor([self.rows[p] for p in prompts])
        return {key: value.to(device) for key, value in index_conditioning(self.cond, index).items()}


class _WeightEMAUpdate(TrainerCallback):
    """Folds the trained weights into the trainer's `ParameterEMA` after every optimizer step (before logging,
    evaluation and saving, which `Trainer` runs after `on_step_end`)."""

    def __init__(self, ema: ParameterEMA):
        self.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update(state.global_step)


class FlowRLTrainer(CheckpointMixin, ModelCardMixin, Trainer):
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
        check_datasets(train_dataset, eval_dataset)
        check_regularizers(type(self), args)
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
        if args.offload_reward_models and not any(isinstance(f, RewardModel) for f in self.reward_funcs):
            raise ValueError(
                f"offload_reward_models=True, but none of the reward functions ({', '.join(self.reward_func_names)}) "
                "holds a torch model to move: it applies to flow_trl.rewards.RewardModel rewards such as PickScore "
                "or HPSv2 (see RewardModel.modules). Set offload_reward_models=False."
            )
        self.resolution = args.resolution or self.adapter.default_resolution
        try:
            self.adapter.latent_shape(self.resolution, self.resolution)
        except ValueError as error:
            raise ValueError(f"resolution {self.resolution} does not fit this pipeline. {error}") from error

        transformer = self.adapter.transformer
        self.policies = Policies(self.adapter, self._policy_adapters, peft_config, args.full_finetune_params,
                                 args.lora_export_rank, owner=type(self).__name__)
        for module in self.adapter.frozen_modules():
            module.requires_grad_(False).eval()
        self._prepared_output_dir: str | None = None  # the output_dir `train` has checked (see `prepare_output_dir`)
        if args.disable_dropout:
            from trl.trainer.utils import disable_dropout_in_model  # here: importing trl takes ~0.2 s

            disable_dropout_in_model(transformer)
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
            data_collator=list,  # the rows as they are: prompts and reward columns
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
        self._place_frozen_modules()
        self.policies.to(self.accelerator.device)
        self.sigmas = self.adapter.sigma_grid(args.num_inference_steps, self.resolution, self.resolution)
        # the static shift the pipeline applies at this resolution, for the trainers' training-timestep draws
        self.sigma_shift = self.adapter.sigma_shift(self.resolution, self.resolution, args.num_inference_steps)
        self._prompt_cache = self._cache_prompt_embeddings() if args.cache_prompt_embeddings else None
        self._negative_cond = None
        if args.guidance_scale != 1.0 or self.rollout_guidance_scale != 1.0:
            self._negative_cond = self.encode_prompts([""])
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._buffered_inputs: list[dict[str, Any]] | None = None
        self._rollouts = RolloutCounter(args.seed)
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

    @property
    def is_lora(self) -> bool:
        """Whether a LoRA adapter is trained (else the whole transformer, or its linear weights)."""
        return self.policies.is_lora

    def _soft_update(self, target: str, schedule: str, max_decay: float, metric: str) -> None:
        """Soft-update the lagged policy `target` toward the trained one, with the decay of the current optimizer step.

        Called before each rollout, it acts once per optimizer step: not before the first one, and not before a later
        rollout of the same optimizer step (the trained policy has not moved since, so every rollout of one
        optimizer step samples the same lagged policy, like one epoch of the reference implementations).
        """
        if self.state.global_step == 0 or not self._rollouts.is_first_of_step:
            return
        decay = soft_update_decay(self.state.global_step, schedule, max_decay)
        self.policies.soft_update(target, decay)
        self._metrics["train"][metric].append(decay)

    @contextmanager
    def policy(self, name: str, model: nn.Module | None = None):
        """Yield the module that computes policy `name` (see `Policies.policy`); "default" is `model` if given (e.g.
        a DDP wrapper), else `self.model`."""
        with self.policies.policy(name, model if model is not None else self.model) as module:
            yield module

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
        """This process's generator for the latest rollout (see `RolloutCounter.generator`)."""
        return self._rollouts.generator(self.state.global_step, self.accelerator.process_index, salt)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode each distinct prompt once and index the result back to the batch.

        With `cache_prompt_embeddings` the prompts are looked up instead; with `offload_text_encoders` the text
        encoders are on the accelerator for this call only.
        """
        if self._prompt_cache is not None:
            return self._prompt_cache.lookup(prompts, self.accelerator.device)
        unique = list(dict.fromkeys(prompts))
        with onloaded(self.adapter.text_encoders(), self.accelerator.device, self.args.offload_text_encoders):
            cond = self.adapter.encode_prompts(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=next(iter(cond.values())).device)
        return index_conditioning(cond, index)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] of `latents` (`adapter.decode`); with `offload_vae` the VAE is on the
        accelerator for this call only."""
        with onloaded([self.pipe.vae], self.accelerator.device, self.args.offload_vae):
            return self.adapter.decode(latents)

    def score(self, prompts: list[str], images: torch.Tensor, columns: dict[str, list[Any]]) -> torch.Tensor:
        """Every reward function's scores ``[B, num_rewards]`` (`compute_rewards`); with `offload_reward_models`
        the reward models are on their devices for this call only."""
        with ExitStack() as stack:
            for model in self._reward_models():
                stack.enter_context(onloaded(model.modules(), model.device, self.args.offload_reward_models))
            return compute_rewards(self.reward_funcs, prompts, images, columns, trainer_state=self.state)

    def _reward_models(self) -> list[RewardModel]:
        """The reward functions that hold torch modules (what `offload_reward_models` moves)."""
        return [func for func in self.reward_funcs if isinstance(func, RewardModel) and func.modules()]

    def _place_frozen_modules(self) -> None:
        """Put the text encoders, the VAE and the reward models where they wait between uses: on the CPU when their
        memory flag offloads them, else on this process's device (reward models are loaded for it)."""
        args = self.args
        encoders = self.adapter.text_encoders()
        for module in self.adapter.frozen_modules():
            offloaded = args.offload_text_encoders if any(module is e for e in encoders) else args.offload_vae
            module.to("cpu" if offloaded else self.accelerator.device)
        if not args.offload_reward_models:
            return
        for func in self.reward_funcs:
            if isinstance(func, RewardModel):
                func.load()
        for model in self._reward_models():
            for module in model.modules():
                module.to("cpu")

    def _cache_prompt_embeddings(self) -> PromptEmbeddingCache:
        """Encode the prompts of the datasets (and the empty negative prompt) once, then release the text encoders."""
        datasets = [d for d in (self.train_dataset, self.eval_dataset) if d is not None]
        if not datasets:
            raise ValueError(
                "cache_prompt_embeddings encodes the prompts of train_dataset and eval_dataset when the trainer is "
                "built, but neither was given. Pass the datasets, or set cache_prompt_embeddings=False."
            )
        prompts = list(dict.fromkeys(["", *(p for d in datasets for p in d["prompt"])]))
        cache = PromptEmbeddingCache(self.adapter.encode_prompts, prompts, self.args.per_device_eval_batch_size)
        self.adapter.release_text_encoders()
        return cache

    def _initial_noise(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Initial latents of a rollout: independent standard normal noise per sample."""
        return self.adapter.initial_noise(num_samples, self.resolution, self.resolution, generator, self.compute_dtype)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator, policy: str = "default", step_type="ode",
               batch_size: int | None = None, guidance_scale: float | None = None,
               sde_steps: list[int] | None = None):
        """Roll out `policy` on `prompts` (CFG scale: `guidance_scale` unless given; stochastic on `sde_steps`, by
        default every step but the last for a stochastic `step_type`); returns ``(conditioning, [Rollout])``."""
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
                    sde_steps=sde_steps,
                    generator=generator,
                ))
        return cond, chunks

    def _rollout_sde_steps(self, generator: torch.Generator) -> list[int] | None:
        """The stochastic steps of the next rollout: `None` (every step but the last, for a stochastic `sde_type`)."""
        return None

    def _generate_and_score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Roll out the sampling policy on this process's rows, score, and compute group advantages."""
        args = self.args
        prompts = [row["prompt"] for row in rows]
        generator = self._rollout_generator()
        cond, chunks = self.sample(prompts, generator, self._sampling_policy, args.sde_type,
                                   batch_size=args.per_device_train_batch_size,
                                   guidance_scale=self.rollout_guidance_scale,
                                   sde_steps=self._rollout_sde_steps(generator))
        latents = torch.cat([c.latents for c in chunks])
        images = self.decode(latents)
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        rewards = self.score(prompts, images, columns)
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
            self._rollouts.start(self.state.global_step)
            self._before_generation()
            inputs = self._generate_and_score(generation_batch)
            order = torch.randperm(len(inputs["latents"]), generator=self._rollout_generator(salt=1))
            self._buffered_inputs = split_rollout(inputs, order, args.steps_per_generation)
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
        # DeepSpeed scales by the accumulation steps itself unless told not to (transformers' Trainer does the same)
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        backward_kwargs = {"scale_wrt_gas": False} if deepspeed else {}
        total = torch.zeros((), device=self.accelerator.device)
        for chunk in range(num_chunks):
            with self._gradient_sync(model, last_chunk=chunk == num_chunks - 1):  # forward too: DDP's no_sync needs it
                with self.compute_loss_context_manager():
                    loss = self._compute_loss(model, inputs, chunk) / num_chunks
                self.accelerator.backward(loss / self.current_gradient_accumulation_steps, **backward_kwargs)
            total += loss.detach()
        self._step += 1
        return total / self.current_gradient_accumulation_steps

    @contextmanager
    def _gradient_sync(self, model: nn.Module, last_chunk: bool):
        """Gradients of a micro-batch's loss chunks accumulate locally and are synchronised with the last chunk's
        backward: DDP skips its all-reduce (`no_sync`), and DeepSpeed, which steps its optimizer inside `backward` at
        an accumulation boundary, sees the boundary only once."""
        state = self.accelerator.gradient_state
        if last_chunk or not state.sync_gradients:  # not a boundary, or the boundary's last backward
            yield
            return
        state._set_sync_gradients(False)
        try:
            with self.accelerator.no_sync(model):
                yield
        finally:
            state._set_sync_gradients(True)

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
        metrics = {"velocity_norm_ratio": velocity_norm_ratio(v.detach(), v_ref).mean()}
        coef = self._velocity_kl_coef()
        if coef == 0:
            return v.new_zeros(()), metrics
        loss, kl_metrics = velocity_kl(v, v_ref, coef)
        return loss, {**metrics, **kl_metrics}

    def reference_terms(self, latents, sigma, cond, v: torch.Tensor, v_ref: torch.Tensor | None = None,
                        transition=None):
        """Regularization of velocity `v` against the reference at the same inputs (0 when none is needed).

        Pass `v_ref` when the algorithm already computed the reference velocity there, to save the forward. SDE
        trainers also pass their replayed `transition` (a `transitions.Transition`), which regularizers with an
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

    def _log_train_metrics(self, metrics: dict[str, float | torch.Tensor]) -> None:
        """Queue per-step training metrics; `log` averages them over the logging interval.

        Values may be detached 0-d tensors: they stay on their device until `log` reads them all at once, so a loss
        chunk never waits for the device.
        """
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
                scores += self.score(prompts, imgs, columns).tolist()
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
        return self.decode(out.latents)

    def _eval_metrics(self, scores: torch.Tensor, prefix: str, suffix: str) -> dict[str, float]:
        metrics = {}
        for j, name in enumerate(self.reward_func_names):
            metrics[f"{prefix}_rewards/{name}/mean{suffix}"] = scores[:, j].nanmean().item()
        metrics[f"{prefix}_reward{suffix}"] = weighted_reward(scores, self.args.reward_weights).nanmean().item()
        return metrics

    def _save_samples(self, images: torch.Tensor) -> None:
        from ..images import save_image_grid

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
        queued = {k: v for k, v in self._metrics[mode].items() if v}
        values = iter(to_floats([value for values in queued.values() for value in values]))
        metrics = {k: sum(next(values) for _ in v) / len(v) for k, v in queued.items()}
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
        warn_if_never_evaluated(self.args, self.eval_dataset)
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
            "images_generated": self._rollouts.count * self.args.generation_batch_size,
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

def to_floats(values: list[float | torch.Tensor]) -> list[float]:
    """`values` (numbers and 0-d tensors) as Python floats, read with one device-to-host copy per device instead of
    one per tensor."""
    out = list(values)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            by_device[value.device].append(i)
    for indices in by_device.values():
        read = torch.stack([values[i].detach().reshape(()) for i in indices]).tolist()
        for i, value in zip(indices, read):
            out[i] = value
    return out


def format_training_summary(summary: dict[str, Any]) -> str:
    """A few readable lines of `FlowRLTrainer.training_summary`."""
    seen = (f"{summary['images_generated']} images generated" if "images_generated" in summary
            else f"{summary['pairs_seen']} preference pairs seen")
    lines = [f"{summary['algorithm']} training finished: {summary['steps']} steps, {seen}"
             + (f", {summary['train_runtime_s']:.0f} s" if "train_runtime_s" in summary else "")]
    for key, value in summary.items():
        if isinstance(value, tuple):
            lines.append(f"  {key:<32}{value[0]:>9.4f} -> {value[1]:.4f}  (first -> last logged)")
    lines.append(f"  saved to {summary['output_dir']}/")
    return "\n".join(lines)


__all__ = ["FlowRLTrainer", "format_training_summary"]
