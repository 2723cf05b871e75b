"""`DanceGRPOConfig`: GRPO on SDE rollouts (DanceGRPO, Flow-GRPO, CPS), with optional SLAS advantage shaping."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..advantages import ADVANTAGE_STDS
from .base_config import FlowRLConfig
from .validation import check_choice, check_positive


KL_TYPES = ("velocity", "sde_mean")


@dataclass
class DanceGRPOConfig(FlowRLConfig):
    r"""
    Configuration of [`DanceGRPOTrainer`] (DanceGRPO, https://huggingface.co/papers/2505.07818; Flow-GRPO,
    https://huggingface.co/papers/2505.05470, with `sde_type="flow_sde"`).

    Inherits every field of [`FlowRLConfig`] (among them the advantage settings: `scale_rewards`, and SLAS through
    `advantage_shaping="slas"`, `slas_gamma`, `slas_order`). GRPO-specific fields:

    sde_type (`str`, defaults to `"dance_sde"`):
        The stochastic step of rollouts and of the policy's log-prob: `"dance_sde"` (DanceGRPO), `"flow_sde"`
        (Flow-GRPO) or `"cps"` (coefficients-preserving); the names of [`FlowRLConfig`]'s `sde_type`, without `"ode"`.
    noise_level (`float`, defaults to `0.3`):
        eta of the SDE (DanceGRPO 0.3 for FLUX, Flow-GRPO 0.7): positive, and at most 1 for `"cps"` (whose std
        `sigma_next sin(eta pi / 2)` is largest at 1 and repeats smaller values above it).
    advantage_std (`str`, defaults to `"population"`):
        The std of `scale_rewards="group"`/`"batch"`: `"population"`, `(r - mean) / (std + 1e-4)` with the population
        std (Flow-GRPO's numpy, every other flow_trl trainer), or `"unbiased"`, `(r - mean) / (std + 1e-8)` with
        torch's unbiased std (DanceGRPO's code: advantages `sqrt((G - 1) / G)` times the population ones, 0.94 for
        G = 8). `"population"` is the default so that `scale_rewards` means the same for every trainer, and because
        its larger eps keeps groups of near-equal rewards (differences below about 1e-4) from being blown up to
        advantages of order 1; set `"unbiased"` to reproduce DanceGRPO. SLAS keeps its batch population std.
    clip_range (`float`, defaults to `1e-4`):
        PPO clip of the per-step ratio `exp(logp - logp_old)` (log-probs are means over dimensions, which sets this
        scale).
    timestep_fraction (`float`, defaults to `0.6`):
        Each sample trains on a random `int(num_inference_steps * timestep_fraction)` (at least 1) of its stochastic
        transitions, counted over the sampling steps as Flow-GRPO does; the last transition (to sigma 0) is never
        stochastic, hence never trained, so 0.99 of 10 steps trains the other 9. Each trained transition is a loss
        chunk of one forward and backward (plus a reference forward with `beta > 0`).
    sde_window_size (`int`, *optional*):
        Flow-GRPO-Fast's SDE window (also MixGRPO's): each rollout is stochastic on only this many consecutive steps
        and an Euler ODE elsewhere, and only those transitions are recorded and trained (`timestep_fraction` then
        picks among them). The window's first step is drawn uniformly for each rollout within `sde_window_range`.
        Unset: every step but the last is stochastic (Flow-GRPO, DanceGRPO).
    sde_window_range (`list[int]`, *optional*):
        `[first, end)`: the step indices the window lies within.
        Unset: every stochastic step, `[0, num_inference_steps - 1)`.
    same_initial_noise (`bool`, defaults to `False`):
        All images of a group start from the same initial noise (DanceGRPO's `init_same_noise`); they then differ
        only by the SDE noise. Needs whole groups on each process (`per_device_train_batch_size *
        steps_per_generation` divisible by `num_generations`).
    slas_target_kl (`float`, *optional*):
        With `advantage_shaping="slas"`: adapt `slas_gamma` before each rollout to keep the mean `approx_kl` of the
        previous rollout's updates within a factor 1.5 of this target (x1.1 when below, /1.1 when above, in
        [0, 4]), the KL-coupled gamma appendix E suggests. The current gamma is logged as `slas/gamma`; checkpoints
        save it, so a resumed run continues from the adapted value.
    kl_type (`str`, defaults to `"sde_mean"`):
        With `beta > 0`: `"sde_mean"`, Flow-GRPO's `mean_dims (mu - mu_ref)^2 (-dt) / (2 std^2)` between the two
        policies' step means, or `"velocity"`, `mean_dims (v - v_ref)^2`.

    > [!NOTE]
    > Defaults that differ from [`FlowRLConfig`], following DanceGRPO: `sde_type="dance_sde"`, `noise_level=0.3`;
    > as [`FlowRLConfig`], no CFG (`guidance_scale=1.0`), no KL (`beta=0.0`), `scale_rewards="group"` (per-group
    > std, as DanceGRPO; SLAS uses the batch std); and
    > `disable_dropout=True`, so that the first replay of a rollout has a ratio of exactly 1 (as TRL's `GRPOConfig`).
    """

    disable_dropout: bool = field(
        default=True, metadata={"help": "Zero every dropout of the policy so replayed log-probs match the rollout's."}
    )
    sde_type: str = field(default="dance_sde", metadata={"help": "Rollout SDE: 'dance_sde', 'flow_sde' or 'cps'."})
    noise_level: float = field(default=0.3, metadata={"help": "eta of the SDE: > 0; at most 1 for 'cps'."})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range of the per-step log-prob ratio."})
    timestep_fraction: float = field(
        default=0.6,
        metadata={"help": "Transitions trained per sample: int(num_inference_steps x this), never the last one "
                  "(one forward and backward each)."},
    )
    sde_window_size: int | None = field(
        default=None,
        metadata={"help": "Stochastic steps per rollout, consecutive, ODE elsewhere (Flow-GRPO-Fast); unset: all."},
    )
    sde_window_range: list[int] | None = field(
        default=None,
        metadata={"help": "[first, end) step indices the SDE window lies within; unset: every stochastic step."},
    )
    same_initial_noise: bool = field(
        default=False, metadata={"help": "One initial noise per group (DanceGRPO's init_same_noise)."}
    )
    slas_target_kl: float | None = field(
        default=None, metadata={"help": "SLAS: adapt slas_gamma to keep approx_kl near this target (unset: fixed)."}
    )
    kl_type: str = field(default="sde_mean", metadata={"help": "KL form with beta > 0: 'sde_mean' or 'velocity'."})
    advantage_std: str = field(
        default="population",
        metadata={"help": "Advantage std: 'population' (+ 1e-4; Flow-GRPO; the default, as every flow_trl "
                  "trainer) or 'unbiased' (+ 1e-8; DanceGRPO's code)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sde_type == "ode":
            raise ValueError(
                "GRPO needs a stochastic policy: sde_type must be 'dance_sde', 'flow_sde' or 'cps', not 'ode'."
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1]; got {self.timestep_fraction}.")
        check_positive("clip_range", self.clip_range)
        self._check_sde_window()
        if self.slas_target_kl is not None and (self.slas_target_kl <= 0 or self.advantage_shaping != "slas"):
            raise ValueError("slas_target_kl must be positive and needs advantage_shaping='slas'.")
        check_choice("kl_type", self.kl_type, KL_TYPES)
        check_choice("advantage_std", self.advantage_std, ADVANTAGE_STDS)
        if self.same_initial_noise and (self.per_device_train_batch_size * self.steps_per_generation) % (
            self.num_generations
        ):
            raise ValueError(
                "same_initial_noise needs whole groups on each process: per_device_train_batch_size x "
                f"steps_per_generation ({self.per_device_train_batch_size} x {self.steps_per_generation}) must be "
                f"divisible by num_generations ({self.num_generations})."
            )

    @property
    def sde_window_bounds(self) -> tuple[int, int]:
        """`[first, end)` of the step indices an SDE window may cover (`sde_window_range`, else every step that can be
        stochastic: all but the last)."""
        if self.sde_window_range is None:
            return 0, self.num_inference_steps - 1
        return self.sde_window_range[0], self.sde_window_range[1]

    def _check_sde_window(self) -> None:
        if self.sde_window_size is None:
            if self.sde_window_range is not None:
                raise ValueError("sde_window_range needs sde_window_size (the window's length); set both or neither.")
            return
        check_positive("sde_window_size", self.sde_window_size)
        if self.sde_window_range is not None and len(self.sde_window_range) != 2:
            raise ValueError(f"sde_window_range must be two step indices [first, end); got {self.sde_window_range}.")
        first, end = self.sde_window_bounds
        last_stochastic = self.num_inference_steps - 1  # the step to sigma 0 is never stochastic
        if not 0 <= first < end <= last_stochastic or end - first < self.sde_window_size:
            raise ValueError(
                f"An SDE window of {self.sde_window_size} steps must fit in sde_window_range [{first}, {end}), which "
                f"must lie within [0, {last_stochastic}) for num_inference_steps={self.num_inference_steps} (the last "
                "step, to sigma 0, is always an ODE step). Lower sde_window_size or widen sde_window_range."
            )
