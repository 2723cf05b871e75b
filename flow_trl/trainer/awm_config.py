"""`FlowAWMConfig`: Advantage Weighted Matching's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..timesteps import TIMESTEP_SAMPLERS
from .base_config import FlowRLConfig, NormGuardArguments
from .utils import SOFT_UPDATE_SCHEDULES
from .validation import check_choice, check_non_negative, check_positive


AWM_WEIGHTINGS = ("ghuber", "uniform")


@dataclass
class FlowAWMConfig(NormGuardArguments, FlowRLConfig):
    r"""
    Configuration of [`FlowAWMTrainer`] (Advantage Weighted Matching, https://huggingface.co/papers/2509.25050).

    Inherits every field of [`FlowRLConfig`]. AWM-specific fields:

    weighting (`str`, defaults to `"ghuber"`):
        The flow-matching "log-likelihood" of a sample at sigma `t`: `"ghuber"`,
        `-t ((mse + 1e-10)^p - 1e-10^p) / p` with `p = ghuber_power` (down-weights high-error samples), or
        `"uniform"`, `-mse`.
    ghuber_power (`float`, defaults to `0.25`):
        The generalised-Huber exponent `p` (in (0, 1]).
    clip_range (`float`, defaults to `1.0`):
        PPO clip of the likelihood ratio `exp(l - l_old)`, `[1 - clip_range, 1 + clip_range]`. In the optimizer step
        that follows a rollout the ratio is exactly 1 (its gradient is not); later optimizer steps on the same rollout
        (`steps_per_generation` or `num_iterations` above `gradient_accumulation_steps`) compare with the
        log-likelihood of the policy that sampled, and there the clip is a trust region.
    advantage_scale (`float`, defaults to `5.0`), advantage_max (`float`, defaults to `1.0`):
        Advantages (clipped to `advantage_clip` beforehand) are multiplied by `advantage_max / advantage_scale`: with
        the defaults, `[-5, 5]` becomes `[-1, 1]`, the reference's normalisation by its advantage clip.
    timestep_sampler (`str`, defaults to `"discrete_wo_init"`):
        Training sigmas per micro-batch (shared by its samples): `"discrete_wo_init"` (GenEval/OCR), `"discrete"`
        (PickScore), `"logit_normal"` or `"uniform"`; see `flow_trl.timesteps`.
    num_train_timesteps (`int`, defaults to `6`):
        Training sigmas per sample (one backward pass each): a loss chunk of one trained forward plus those of
        `ema_kl_coef` and `beta`.
    ema_kl_coef (`float`, defaults to `1.0`):
        Coefficient of the velocity KL to the EMA adapter, `mean (v_theta - v_ema)^2` (a trust region around a
        lagged copy of the policy). Above 0 it adds one forward of the EMA adapter per loss chunk; `0` drops the term
        and its forward.
    ema_decay_schedule (`str`, defaults to `"linear"`):
        Soft update of the EMA adapter before each rollout, `ema <- d ema + (1 - d) theta`: `"linear"`
        (`d = min(0.001 step, ema_max_decay)`), `"delayed"` or `"none"` (`d = 0`).
    ema_max_decay (`float`, defaults to `0.3`):
        Cap of the `"linear"` schedule.

    > [!NOTE]
    > Defaults that differ from [`FlowRLConfig`], following the reference's GenEval config: `beta=1e-3` (velocity KL
    > to the base model; 1e-4 for PickScore; one reference forward per loss chunk),
    > `scale_rewards="batch"` (global std), `disable_dropout=True` (the likelihood ratio compares the training
    > forward with the sampling policy's). The reference samples with a stochastic SA-Solver (noise 0.4 for
    > GenEval); here any `sde_type` works and the default is the Euler ODE. The reference trains one optimizer
    > step per rollout (`steps_per_generation=1`), strictly on-policy. NormGuard's paper uses `norm_guard_coef=0.01`
    > with AWM. As in [`FlowRLConfig`], rollouts and training are CFG-free (`guidance_scale=1.0`).
    """

    beta: float = field(
        default=1e-3,
        metadata={"help": "Velocity KL coefficient to the reference (base) model; > 0 adds one reference forward per "
                  "loss chunk."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Zero every dropout of the policy so the likelihood ratio starts at 1."}
    )
    scale_rewards: str = field(
        default="batch", metadata={"help": "Advantage std: 'batch' (global std, AWM's default), 'group' or 'none'."}
    )
    weighting: str = field(default="ghuber", metadata={"help": "Likelihood weighting: 'ghuber' or 'uniform'."})
    ghuber_power: float = field(default=0.25, metadata={"help": "Generalised-Huber exponent p in (0, 1]."})
    clip_range: float = field(default=1.0, metadata={"help": "PPO clip range of the ratio to the sampling policy."})
    advantage_scale: float = field(
        default=5.0, metadata={"help": "Advantages are multiplied by advantage_max / advantage_scale."}
    )
    advantage_max: float = field(
        default=1.0, metadata={"help": "Advantages are rescaled from [-advantage_scale, advantage_scale] to +-this."}
    )
    timestep_sampler: str = field(
        default="discrete_wo_init",
        metadata={"help": "Training sigmas: 'discrete_wo_init', 'discrete', 'logit_normal' or 'uniform'."},
    )
    num_train_timesteps: int = field(
        default=6, metadata={"help": "Training sigmas per sample (one loss chunk, forward and backward, each)."}
    )
    ema_kl_coef: float = field(
        default=1.0,
        metadata={"help": "Velocity KL coefficient to the EMA adapter (0: off; > 0 adds one EMA forward per chunk)."},
    )
    ema_decay_schedule: str = field(
        default="linear", metadata={"help": "EMA adapter soft-update schedule: 'linear', 'delayed' or 'none'."}
    )
    ema_max_decay: float = field(default=0.3, metadata={"help": "Cap of the 'linear' EMA schedule."})

    def __post_init__(self):
        super().__post_init__()
        check_choice("weighting", self.weighting, AWM_WEIGHTINGS)
        if not 0 < self.ghuber_power <= 1:
            raise ValueError(f"ghuber_power must be in (0, 1]; got {self.ghuber_power}.")
        check_choice("timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS[1:])  # all but "grid_subset"
        check_choice("ema_decay_schedule", self.ema_decay_schedule, SOFT_UPDATE_SCHEDULES)
        for name in ("clip_range", "advantage_scale", "advantage_max", "num_train_timesteps"):
            check_positive(name, getattr(self, name))
        check_non_negative("ema_kl_coef", self.ema_kl_coef)
