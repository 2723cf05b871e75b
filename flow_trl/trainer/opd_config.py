"""`FlowOPDConfig`: on-policy distillation from task-routed teacher LoRAs (Flow-OPD)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import ManifoldAnchorArguments
from .grpo_config import DanceGRPOConfig
from .validation import check_choice, check_positive


OPD_MODES = ("kl_only", "gkd", "mixed")
COLD_STARTS = ("none", "merge", "merge_deltas")


def parse_teachers(teachers: dict[str, str] | list[str] | None) -> dict[str, str]:
    """`{task: LoRA path}` from a mapping or from ``["task=path", ...]`` (the command-line form)."""
    if teachers is None:
        return {}
    if isinstance(teachers, dict):
        return {str(task): str(path) for task, path in teachers.items()}
    mapping = {}
    for item in teachers:
        task, sep, path = str(item).partition("=")
        if not sep or not task or not path:
            raise ValueError(f"teachers entries are 'task=path'; got {item!r}.")
        if task in mapping:
            raise ValueError(f"Task {task!r} is given two teachers; give each task one teacher.")
        mapping[task] = path
    return mapping


@dataclass
class FlowOPDConfig(ManifoldAnchorArguments, DanceGRPOConfig):
    r"""
    Configuration of [`FlowOPDTrainer`] (Flow-OPD, "On-Policy Distillation for Flow Matching Models",
    https://huggingface.co/papers/2605.08063; docs/algorithms.md#opd, docs/opd.md).

    Inherits every field of [`DanceGRPOConfig`] (the SDE of rollouts, PPO clip, timestep fraction) and of
    [`FlowRLConfig`], among them MAR: `mar_coef` (Flow-OPD's beta 0.04; one anchor forward per trained transition)
    and `mar_adapter` (unset: the base model). Each trained transition also runs the forward of every teacher routed
    to a sample of the micro-batch.
    OPD fields:

    teachers (`dict[str, str]` or `list[str]`):
        The teacher of each task: a mapping `{task: LoRA}` or `["task=LoRA", ...]` (the command-line form,
        `--teachers counting=teachers/counting colors=teachers/attributes`). A LoRA is a diffusers-format folder or
        file (as `flow-trl` saves) or a Hub id, trained on the student's base model with the student's targets, rank
        and alpha. Several tasks may share one teacher (it is loaded once). Required (or the trainer's `teachers=`).
    task_column (`str`, defaults to `"task"`):
        Dataset column whose value routes each sample to its teacher (the shapes world's family column is `tag`).
    opd_mode (`str`, defaults to `"kl_only"`):
        `"kl_only"` (Flow-OPD's default): PPO-clipped surrogate whose per-step advantage is `-teacher_kl_coef * KL_j`,
        not detached; `"gkd"`: minimise `teacher_kl_coef * mean KL_j` directly (no ratio); `"mixed"`: advantage
        `A_task - teacher_kl_coef * KL_j` with the group-normalised task advantage of the reward functions. Every
        advantage is clipped to `advantage_clip`.
    teacher_kl_coef (`float`, defaults to `1.0`):
        Scale of the per-step KL reward (Flow-OPD's `-kl_scale`, 1).
    filter_constant_reward_groups (`bool`, defaults to `False`):
        Drop (zero the loss of) groups whose task reward is constant, as Flow-OPD's code does in every mode. Off by
        default: the KL signal of such groups is valid. The groups are judged on the rewards of all processes, so a
        group may straddle two; `"gkd"` averages its loss over the kept samples only.
    cold_start (`str`, defaults to `"none"`):
        `"merge"`: the student's adapter starts as the element-wise mean of the teachers' LoRA factors
        (`flow_trl.lora.merge_lora_adapters`, Flow-OPD's merge cold start, for teachers trained as LoRAs from the
        same initialisation); `"merge_deltas"`: as the mean of the teachers' weight changes ``scale B @ A``,
        re-factored at the student's rank (`flow_trl.lora.average_lora_deltas`: the teachers' model soup, exact when
        the rank reaches every layer's smaller dimension), for teachers exported from full fine-tunes
        (`lora_export_rank`), whose factors come from separate decompositions; `"none"`: the usual fresh LoRA.
    init_adapter (`str`, *optional*):
        A diffusers-format LoRA to start the student's adapter from (e.g. the output of `merge_lora_adapters`
        with other weights). Exclusive with a merge `cold_start`.

    > [!NOTE]
    > Defaults that differ from [`DanceGRPOConfig`], following Flow-OPD: `sde_type="flow_sde"`, `noise_level=0.7`,
    > `timestep_fraction=0.99`, `mar_coef=0.04`. `advantage_std` stays `"population"` (std + 1e-4), the convention of
    > Flow-GRPO, on whose code Flow-OPD is built; it matters only for `opd_mode="mixed"`'s task advantage.
    """

    sde_type: str = field(default="flow_sde", metadata={"help": "Rollout SDE: 'dance_sde', 'flow_sde' or 'cps'."})
    noise_level: float = field(default=0.7, metadata={"help": "eta of the SDE: > 0; at most 1 for 'cps'."})
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "Fraction of each sample's stochastic transitions trained (never the last)."}
    )
    mar_coef: float = field(
        default=0.04,
        metadata={"help": "Manifold Anchor Regularization: KL coefficient to the anchor (Flow-OPD's 0.04; 0: off, "
                  "> 0 adds one anchor forward per trained transition)."},
    )
    teachers: list[str] | None = field(
        default=None,
        metadata={"help": "Teacher LoRA of each task: 'task=path' entries (or a YAML mapping task: path)."},
    )
    task_column: str = field(default="task", metadata={"help": "Dataset column that routes samples to teachers."})
    opd_mode: str = field(default="kl_only", metadata={"help": "'kl_only' (PPO, KL reward), 'gkd' or 'mixed'."})
    teacher_kl_coef: float = field(default=1.0, metadata={"help": "Scale of the per-step -KL reward."})
    filter_constant_reward_groups: bool = field(
        default=False, metadata={"help": "Zero the loss of groups whose task reward is constant."}
    )
    cold_start: str = field(
        default="none",
        metadata={"help": "'merge': start the student as the mean of the teachers' LoRA factors (Flow-OPD); "
                  "'merge_deltas': as the mean of their weight changes (teachers exported from full fine-tunes); "
                  "'none'."},
    )
    init_adapter: str | None = field(
        default=None, metadata={"help": "LoRA to start the student's adapter from (exclusive with cold_start)."}
    )

    def __post_init__(self):
        super().__post_init__()
        parse_teachers(self.teachers)  # malformed entries fail here; the trainer resolves them
        check_choice("opd_mode", self.opd_mode, OPD_MODES)
        check_choice("cold_start", self.cold_start, COLD_STARTS)
        if self.cold_start != "none" and self.init_adapter is not None:
            raise ValueError(f"Set either cold_start={self.cold_start!r} or init_adapter, not both.")
        check_positive("teacher_kl_coef", self.teacher_kl_coef)
