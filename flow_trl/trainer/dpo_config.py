"""`FlowDPOConfig`: Diffusion-DPO's configuration (online and offline)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..timesteps import TIMESTEP_SAMPLERS
from .base_config import FlowRLConfig, NormGuardArguments
from .validation import check_choice, check_positive


ROLLOUT_POLICIES = ("policy", "reference")
DEFAULT_NUM_GENERATIONS = 8


@dataclass
class FlowDPOConfig(NormGuardArguments, FlowRLConfig):
    r"""
    Configuration of [`FlowDPOTrainer`] (Diffusion-DPO, https://huggingface.co/papers/2311.12908, on the flow-matching
    velocity as in flow_grpo's SD3 DPO).

    Inherits every field of [`FlowRLConfig`]. The trainer is offline when the training dataset has `chosen` and
    `rejected` image columns (TRL's preference format), online otherwise (pairs from its own rollouts).

    dpo_beta (`float`, defaults to `100.0`):
        Temperature of the DPO loss `-log sigmoid(-0.5 dpo_beta [(mse_w - mse_ref_w) - (mse_l - mse_ref_l)])` on
        velocity MSEs (the reference's value for LoRA on velocity; the original epsilon-space Diffusion-DPO used
        5000). TRL's `DPOConfig` calls it `beta`; here `beta` is, as in every flow_trl config (and TRL's
        `GRPOConfig`), the coefficient of the velocity KL to the base model.
    num_train_timesteps (`int`, defaults to `4`):
        Sigmas per pair per micro-batch, one backward pass each; winner and loser share each sigma and its noise.
        Each is a loss chunk of two forwards on winners and losers together: the trained policy's and the DPO
        reference's (which also serves `beta`'s KL while the reference is the base model).
    timestep_sampler (`str`, defaults to `"logit_normal"`):
        How the training sigmas are drawn (independently per pair): `"logit_normal"` (the reference: logit-normal
        through the scheduler's shift), `"uniform"`, `"discrete"` or `"discrete_wo_init"` (see `flow_trl.timesteps`).
    num_generations (`int`, *optional*):
        Online only: images per prompt; each group gives `pairs_per_group` pairs by reward rank (groups with equal
        rewards give none). Defaults to 8 online; ignored offline.
    pairs_per_group (`int`, defaults to `1`):
        Online only: pairs per group of `num_generations` images, matched by rank: the best image against the worst
        (the reference's one pair), then the second best against the second worst, and so on; at most
        `num_generations // 2`. With `num_generations // 2` every image of the rollout is in a pair, for as many
        more training forwards per micro-batch.
    rollout_policy (`str`, defaults to `"policy"`):
        Online only: who samples the rollouts: the trained `"policy"` (online DPO) or the DPO `"reference"`.
    ref_update_steps (`int`, *optional*):
        Copy the trained policy into the DPO reference every this many optimizer steps (the reference's
        `ref_update_step`; about 40 for online DPO). Unset: the reference is the base model throughout.

    > [!NOTE]
    > Defaults that differ from [`FlowRLConfig`]: `learning_rate=1e-4`. As in [`FlowRLConfig`], training is
    > CFG-free (`guidance_scale=1.0`, as the reference). Each micro-batch of `per_device_train_batch_size` images holds
    > `per_device_train_batch_size / num_generations * pairs_per_group` online pairs (`per_device_train_batch_size`
    > pairs offline).
    > NormGuard's paper uses `norm_guard_coef=1.0` with DPO.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    num_generations: int | None = field(
        default=None, metadata={"help": "Online: images per prompt, pairs_per_group pairs each (8 if unset)."}
    )
    pairs_per_group: int = field(
        default=1,
        metadata={"help": "Online: pairs per group by reward rank (best-worst, 2nd best-2nd worst, ...); at most "
                  "num_generations // 2. Each pair costs its training forwards."},
    )
    dpo_beta: float = field(default=100.0, metadata={"help": "DPO temperature on velocity MSEs."})
    num_train_timesteps: int = field(
        default=4,
        metadata={"help": "Shared sigmas per pair per micro-batch (one loss chunk each: trained and DPO-reference "
                  "forwards)."},
    )
    timestep_sampler: str = field(
        default="logit_normal",
        metadata={"help": "Training sigmas: 'logit_normal', 'uniform', 'discrete' or 'discrete_wo_init'."},
    )
    rollout_policy: str = field(
        default="policy", metadata={"help": "Online: who samples rollouts, 'policy' or 'reference'."}
    )
    ref_update_steps: int | None = field(
        default=None, metadata={"help": "Copy the policy into the DPO reference every N steps (unset: base model)."}
    )

    def __post_init__(self):
        if self.pairs_per_group < 1:  # before the group checks, which bound it above only when online
            raise ValueError(f"pairs_per_group must be at least 1; got {self.pairs_per_group}.")
        super().__post_init__()
        check_positive("dpo_beta", self.dpo_beta)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be at least 1; got {self.num_train_timesteps}.")
        check_choice("timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS[1:])  # all but "grid_subset"
        check_choice("rollout_policy", self.rollout_policy, ROLLOUT_POLICIES)
        check_positive("ref_update_steps", self.ref_update_steps, optional=True)

    def _check_generation_groups(self) -> None:
        if self.num_generations is not None:  # online; offline runs leave it unset
            super()._check_generation_groups()
            if self.per_device_train_batch_size % self.num_generations:
                raise ValueError(
                    "Online DPO trains whole pairs per micro-batch: per_device_train_batch_size "
                    f"({self.per_device_train_batch_size}) must be divisible by num_generations "
                    f"({self.num_generations})."
                )
            if not 1 <= self.pairs_per_group <= self.num_generations // 2:
                raise ValueError(
                    f"pairs_per_group ({self.pairs_per_group}) must be between 1 and num_generations // 2 "
                    f"({self.num_generations // 2}): each image can be in one pair only."
                )

    def use_online_defaults(self) -> None:
        """Set `num_generations` to its online default when unset, and check the group geometry."""
        if self.num_generations is None:
            self.num_generations = DEFAULT_NUM_GENERATIONS
        self._check_generation_groups()
