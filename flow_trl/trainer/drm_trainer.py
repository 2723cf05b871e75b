"""`DRMTrainer`: trains a [`DiffusionRewardModel`] on preference pairs at random noise levels (TRL RewardTrainer-like).

Each pair ``(prompt, chosen, rejected)`` is noised with one shared sigma and noise, both latents are scored at that
sigma, and the Bradley-Terry or the noise-calibrated Thurstone loss pushes the chosen score above the rejected one.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from ..drm.model import DiffusionRewardModel
from ..lora import with_default_targets
from ..models import cat_conditioning, get_adapter, load_pipeline
from ..preference import LATENT_COLUMNS, encode_preference_dataset
from ..timesteps import noise_latents
from .drm_config import DRMConfig
from .policies import TrainedModule


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``mean(-log sigmoid(s_w - s_l))``."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def thurstone_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, sigma: torch.Tensor, base_var: float = 0.05
) -> torch.Tensor:
    """DiNa-LRM's noise-calibrated Thurstone fidelity loss: ``mean(1 - sqrt(p + 1e-6))`` with
    ``p = Phi((s_w - s_l) / sqrt(2 var))`` and ``var = 2 sigma^2 + base_var``: the noisier the pair, the larger the
    assumed score noise, so a noisy pair's preference counts less."""
    var = 2 * sigma.float() ** 2 + base_var
    p = 0.5 * (1 + torch.erf((chosen.float() - rejected.float()) / torch.sqrt(2 * var) / math.sqrt(2)))
    return (1 - torch.sqrt(p + 1e-6)).mean()


def pairwise_correct(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen score is higher, 0.5 on a tie (e.g. at sigma 1, where a pair's shared-noise latents are the
    same), 0 otherwise."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def accuracy_by_bucket(
    correct: torch.Tensor, sigma: torch.Tensor, num_buckets: int, low: float = 0.0, high: float = 1.0
) -> dict[str, float]:
    """Mean of `correct` per equal-width sigma bucket of ``[low, high]`` (empty buckets are left out)."""
    width = max(high - low, 1e-8) / num_buckets
    bucket = ((sigma.float() - low) / width).floor().clamp(0, num_buckets - 1).long()
    out = {}
    for b in range(num_buckets):
        mask = bucket == b
        if mask.any():
            out[f"accuracy/sigma_{low + b * width:.2f}-{low + (b + 1) * width:.2f}"] = (
                correct[mask].float().mean().item()
            )
    return out


class DRMTrainer(Trainer):
    """Trainer of a diffusion-based reward model (DRM, docs/algorithms.md#drm-training) on preference pairs.

    Example:

    ```python
    from flow_trl import DRMConfig, DRMTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_preference_dataset

    trainer = DRMTrainer(
        model=str(SHAPES_PIPELINE_DIR),                 # the generator: its text encoders, VAE and first K blocks
        args=DRMConfig(output_dir="shapes-drm", num_blocks=2),
        train_dataset=shapes_preference_dataset("train"),
    )
    trainer.train()
    trainer.save_model()                                # DiffusionRewardModel.from_pretrained("shapes-drm")
    ```

    Args:
        model (`str` or `DiffusionPipeline`): the generator being aligned (SD3 family), as an id, path or pipeline.
            Its text encoders and VAE encode the data; unless `reward_model` is given, the DRM is built from its
            transformer's first `args.num_blocks` blocks.
        args ([`DRMConfig`], *optional*): the configuration.
        train_dataset, eval_dataset (`datasets.Dataset`): preference pairs: `prompt` and either `chosen`/`rejected`
            images (PIL, paths or arrays; encoded once through the VAE) or `chosen_latents`/`rejected_latents`.
        callbacks, optimizers: as in `Trainer`.
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA on the backbone (the head is always fully trained;
            default targets: the attention projections). Without it, the whole DRM is trained.
        reward_model ([`DiffusionRewardModel`] or `str`, *optional*): a DRM (or its path) to train instead.

    The arguments they share come in the order of [`FlowRLTrainer`]'s (`model, args, ..., train_dataset,
    eval_dataset, callbacks, optimizers, peft_config`).
    """

    _tag_names = ["flow-trl", "diffusers", "reward-model", "drm"]
    _name = "DRM"

    def __init__(
        self,
        model,
        args: DRMConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        peft_config=None,
        reward_model: DiffusionRewardModel | str | None = None,
    ):
        if args is None:
            args = DRMConfig(output_dir="drm")
        elif not isinstance(args, DRMConfig):
            raise TypeError(f"`args` must be a DRMConfig, got {type(args).__name__}.")
        self.pipe = load_pipeline(model, args.model_init_kwargs)
        self.adapter = get_adapter(self.pipe, args.max_sequence_length)
        for module in self.adapter.frozen_modules():
            module.requires_grad_(False).eval()
        if reward_model is None:
            drm = DiffusionRewardModel.from_transformer(self.adapter.transformer, args.num_blocks, args.head_dim)
        elif isinstance(reward_model, DiffusionRewardModel):
            drm = reward_model
        else:
            drm = DiffusionRewardModel.from_pretrained(reward_model)
        if peft_config is not None:
            peft_config = with_default_targets(
                peft_config, self.adapter.default_lora_target_modules, drm.unused_lora_modules()
            )
        self.trained = TrainedModule(drm, peft_config, always_trained=("head_",))  # the new head is always trained
        self.resolution = args.resolution or self.adapter.default_resolution
        train_dataset, eval_dataset = (
            self._encode(d) if d is not None else None for d in (train_dataset, eval_dataset)
        )
        super().__init__(
            model=drm,
            args=args,
            data_collator=self._collate,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # the text encoders and VAE stay where the generator is (the adapter encodes on its transformer's device);
        # batches are moved to the DRM's device by the Trainer
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _encode(self, dataset):
        return encode_preference_dataset(
            dataset,
            self.adapter.encode_images,
            self.resolution,
            model_key=str(self.pipe.config.get("_name_or_path", "")),
        )

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt", *LATENT_COLUMNS]

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack the pair latents and encode each distinct prompt once."""
        prompts = [r["prompt"] for r in rows]
        unique = list(dict.fromkeys(prompts))
        cond = self.adapter.encode_prompts(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=next(iter(cond.values())).device)
        return {
            "chosen": torch.stack([torch.as_tensor(r[LATENT_COLUMNS[0]]) for r in rows]).float(),
            "rejected": torch.stack([torch.as_tensor(r[LATENT_COLUMNS[1]]) for r in rows]).float(),
            "cond": {k: v[index] for k, v in cond.items()},
        }

    def score_pairs(
        self, model: nn.Module, inputs: dict[str, Any], sigma: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and rejected latents, both noised with the same `sigma` ``[B]`` and `noise`, in one
        forward."""
        noisy = torch.cat(
            [noise_latents(inputs["chosen"], sigma, noise), noise_latents(inputs["rejected"], sigma, noise)]
        )
        cond = cat_conditioning([inputs["cond"], inputs["cond"]])
        scores = model(noisy, torch.cat([sigma, sigma]), cond)
        return scores.chunk(2)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        args = self.args
        chosen = inputs["chosen"]
        sigma = args.sigma_min + (args.sigma_max - args.sigma_min) * torch.rand(len(chosen), device=chosen.device)
        noise = torch.randn_like(chosen)
        s_w, s_l = self.score_pairs(model, inputs, sigma, noise)
        if args.loss_type == "thurstone":
            loss = thurstone_loss(s_w, s_l, sigma, args.thurstone_base_var)
        else:
            loss = bradley_terry_loss(s_w, s_l)
        correct = pairwise_correct(s_w.detach(), s_l.detach())
        metrics = {
            "accuracy": correct.float().mean().item(),
            "margin": (s_w - s_l).detach().mean().item(),
            **accuracy_by_bucket(correct, sigma, args.num_sigma_buckets, args.sigma_min, args.sigma_max),
        }
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
        return (loss, {"chosen_scores": s_w, "rejected_scores": s_l}) if return_outputs else loss

    @torch.no_grad()
    def accuracy_by_sigma(self, dataset=None, sigmas: list[float] | None = None) -> dict[float, float]:
        """Pairwise accuracy (`pairwise_correct`) on `dataset` (the eval set by default) at each sigma, with the same
        noise for every sigma (seeded by `eval_seed`) so that the levels differ only by sigma."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("accuracy_by_sigma needs a dataset (or an eval_dataset given to the trainer).")
        sigmas = self.args.eval_sigmas if sigmas is None else sigmas
        self.model.eval()
        correct = {s: [] for s in sigmas}
        generator = torch.Generator().manual_seed(self.args.eval_seed)
        for batch in self.get_eval_dataloader(dataset):
            batch = self._prepare_inputs(batch)
            noise = torch.randn(batch["chosen"].shape, generator=generator).to(batch["chosen"].device)
            for s in sigmas:
                sigma = torch.full((len(noise),), float(s), device=noise.device)
                s_w, s_l = self.score_pairs(self.model, batch, sigma, noise)
                correct[s].append(pairwise_correct(s_w, s_l).cpu())
        return {s: torch.cat(c).float().mean().item() for s, c in correct.items()}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Accuracy at each of `eval_sigmas`: ``<prefix>_accuracy@<sigma>``, and ``<prefix>_accuracy`` on clean
        pairs (the first sigma)."""
        by_sigma = self.accuracy_by_sigma(eval_dataset, self.args.eval_sigmas)
        metrics = {f"{metric_key_prefix}_accuracy@{s:.2f}": acc for s, acc in by_sigma.items()}
        metrics[f"{metric_key_prefix}_accuracy"] = by_sigma[self.args.eval_sigmas[0]]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    @property
    def reward_model(self) -> DiffusionRewardModel:
        """The DRM with any LoRA merged, as a plain [`DiffusionRewardModel`] (a new module when LoRA is used)."""
        return self.trained.merged(self.accelerator.unwrap_model(self.model))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """`save_pretrained` of the (merged) DRM; with LoRA also the trainable weights, for resuming."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.trained.save(output_dir, self.accelerator.unwrap_model(self.model))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        reward_funcs: list[str] | None = None,
        evaluation: dict[str, float] | None = None,
    ) -> None:
        """Write the DRM's model card (`README.md`) into `output_dir`: what the model is, its base, its pairs, its
        held-out accuracy (the last `evaluate()` by default) and how to load it.

        Args:
            model_name: the card's title; the output folder's name by default.
            dataset_name: the preference dataset's id, listed in the metadata when it is a Hub id.
            reward_funcs: the reward names that labelled self-sampled pairs (e.g. ``["shapes"]``).
            evaluation: accuracies to tabulate instead of the last `evaluate()` metrics.
        """
        from huggingface_hub import ModelCard, ModelCardData

        from ..hub import card_hyperparameters, is_hub_id

        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        base = str(getattr(self.pipe, "name_or_path", None) or "")
        if evaluation is None:
            evaluation = next(
                ({k: v for k, v in log.items() if k.startswith("eval_accuracy")}
                 for log in reversed(self.state.log_history) if "eval_accuracy" in log),
                {},
            )
        drm = self.accelerator.unwrap_model(self.model)
        data = ModelCardData(
            base_model=base if is_hub_id(base) else None,
            library_name="flow-trl",
            tags=list(self._tag_names),
            datasets=[dataset_name] if dataset_name and is_hub_id(dataset_name) else None,
        )
        pairs = f"{len(self.train_dataset)} training pairs" if self.train_dataset is not None else "preference pairs"
        source = (f"the `{dataset_name}` preference dataset" if dataset_name else
                  f"the base model's own samples, labelled by {', '.join(reward_funcs or ['a reward'])}")
        lines = [
            f"# {model_name or Path(output_dir).name}",
            "",
            "A diffusion-based reward model (DRM) trained with flow-trl's `DRMTrainer`: "
            f"the first {drm.config.num_blocks} transformer blocks of `{base or 'the generator'}` plus a "
            "reward head. It scores latents at any noise level sigma (clean images at sigma 0), so it can guide "
            "sampling and give Step-wise GRPO per-step advantages.",
            "",
            f"Trained on {pairs} from {source} for {self.state.global_step} steps with the "
            f"{self.args.loss_type} loss.",
        ]
        if evaluation:
            lines += ["", "## Held-out pairwise accuracy", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in evaluation.items()]
        lines += ["", "## Usage", "", "```python", "from flow_trl.drm import DiffusionRewardModel, DRMReward", "",
                  f'drm = DiffusionRewardModel.from_pretrained("{Path(output_dir).name}")',
                  "reward = DRMReward(drm, pipe)  # pipe: the base pipeline; reward(prompts=..., images=...)", "```",
                  "", "## Hyperparameters", "", "| name | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in card_hyperparameters(self.args).items()]
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
        card.save(os.path.join(output_dir, "README.md"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.trained.load(resume_from_checkpoint)


__all__ = [
    "DRMTrainer",
    "accuracy_by_bucket",
    "bradley_terry_loss",
    "pairwise_correct",
    "thurstone_loss",
]
