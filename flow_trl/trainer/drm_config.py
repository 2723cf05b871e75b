"""`DRMConfig`: training a diffusion-based reward model on preference pairs (TRL's `RewardConfig` counterpart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .base_config import accelerator_available
from .validation import check_choice, check_positive


DRM_LOSS_TYPES = ("bradley_terry", "thurstone")


@dataclass
class DRMConfig(TrainingArguments):
    r"""
    Configuration of [`DRMTrainer`] (a [`~transformers.TrainingArguments`] subclass, like TRL's `RewardConfig`).

    Every pair is noised with one shared sigma and one shared noise, ``x_sigma = (1 - sigma) x0 + sigma eps``, and
    both latents are scored at that sigma (ours after DiNa-LRM, docs/algorithms.md#drm-training).

    num_blocks (`int`, defaults to `2`):
        Transformer blocks of the generator kept as the DRM backbone (K), when the trainer builds the DRM; at most the
        generator's depth (at full depth the last block is the generator's text-output-free final block).
    head_dim (`int`, defaults to `64`):
        Width of the reward head's per-token MLP, when the trainer builds the DRM.
    loss_type (`str`, defaults to `"bradley_terry"`):
        `"bradley_terry"`: `-log sigmoid(s_w - s_l)`; `"thurstone"`: DiNa-LRM's noise-calibrated Thurstone fidelity
        loss `1 - sqrt(Phi((s_w - s_l) / sqrt(2 var)) + 1e-6)` with `var = 2 sigma^2 + thurstone_base_var`.
    thurstone_base_var (`float`, defaults to `0.05`):
        The variance of a clean pair's score difference in the Thurstone loss (DiNa-LRM's 0.05).
    sigma_min (`float`, defaults to `0.0`), sigma_max (`float`, defaults to `1.0`):
        Training sigmas are drawn uniformly in `[sigma_min, sigma_max]`, one per pair (DiNa-LRM draws uniformly).
    eval_sigmas (`list[float]`, defaults to `[0.0, 0.2, 0.4, 0.6, 0.8, 0.95]`):
        Noise levels at which `evaluate()` measures pairwise accuracy (fixed noise seeds); `eval_accuracy` is the
        accuracy on clean pairs (sigma 0) and `eval_accuracy@<sigma>` the others.
    num_sigma_buckets (`int`, defaults to `4`):
        Training accuracy is also logged per bucket of sigma (`accuracy/sigma_<lo>-<hi>`), equal-width in
        `[sigma_min, sigma_max]`.
    eval_seed (`int`, defaults to `0`):
        Seed of the evaluation noise.
    max_sequence_length (`int`, *optional*):
        Token length of the long text encoder (as in [`FlowRLConfig`]).
    resolution (`int`, *optional*):
        Image size for preference datasets of images (resized, then VAE-encoded once). Defaults to the pipeline's.
    model_init_kwargs (`dict`, *optional*):
        Keyword arguments for `DiffusionPipeline.from_pretrained` when the generator is given as an id or path.

    > [!NOTE]
    > Defaults that differ from `TrainingArguments`: `learning_rate=1e-4`, `logging_steps=10`,
    > `remove_unused_columns=False`.
    """

    num_blocks: int = field(
        default=2, metadata={"help": "Generator blocks kept as the DRM backbone (K), 1 to the generator's depth."}
    )
    head_dim: int = field(default=64, metadata={"help": "Width of the reward head's per-token MLP."})
    loss_type: str = field(default="bradley_terry", metadata={"help": "'bradley_terry' or 'thurstone'."})
    thurstone_base_var: float = field(default=0.05, metadata={"help": "Thurstone: variance of a clean pair."})
    sigma_min: float = field(default=0.0, metadata={"help": "Lowest training sigma (uniform draws)."})
    sigma_max: float = field(default=1.0, metadata={"help": "Highest training sigma (uniform draws)."})
    eval_sigmas: list[float] = field(
        default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 0.95],
        metadata={"help": "Noise levels of the evaluation accuracy (the first should be 0: clean pairs)."},
    )
    num_sigma_buckets: int = field(default=4, metadata={"help": "Sigma buckets of the logged training accuracy."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation noise."})
    max_sequence_length: int | None = field(default=None, metadata={"help": "Token length of the T5 encoder."})
    resolution: int | None = field(default=None, metadata={"help": "Image size of image preference data."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Kwargs of DiffusionPipeline.from_pretrained for the generator."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every dataset column."})
    dataloader_pin_memory: bool = field(
        default_factory=accelerator_available,
        metadata={"help": "Pin dataloader memory; by default only when there is an accelerator to copy to."},
    )

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    def __post_init__(self):
        super().__post_init__()
        check_choice("loss_type", self.loss_type, DRM_LOSS_TYPES)
        if not 0 <= self.sigma_min <= self.sigma_max <= 1:
            raise ValueError(f"Need 0 <= sigma_min <= sigma_max <= 1; got {self.sigma_min} and {self.sigma_max}.")
        if any(not 0 <= s <= 1 for s in self.eval_sigmas):
            raise ValueError(f"eval_sigmas must lie in [0, 1]; got {self.eval_sigmas}.")
        check_positive("thurstone_base_var", self.thurstone_base_var)
        if self.num_blocks < 1 or self.num_sigma_buckets < 1:
            raise ValueError("num_blocks and num_sigma_buckets must be at least 1.")
        if self.gradient_checkpointing:
            raise ValueError("gradient_checkpointing is not supported by DiffusionRewardModel; leave it off.")
