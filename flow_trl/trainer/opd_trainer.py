"""`FlowOPDTrainer`: on-policy distillation from task-routed teacher LoRAs, with MAR (Flow-OPD)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

import torch

from ..lora import average_lora_deltas, merge_lora_adapters, read_lora, set_adapter_weights
from ..models import index_conditioning
from .grpo_trainer import DanceGRPOTrainer, grpo_clip_loss
from .mixins import ManifoldAnchorMixin
from .opd_config import FlowOPDConfig, parse_teachers
from .transitions import Transition, transition_kl


def opd_advantages(
    kl: torch.Tensor, mode: str, kl_coef: float, task_advantages: torch.Tensor | None = None, clip: float | None = None
) -> torch.Tensor:
    """Per-step advantages `[B]` of Flow-OPD's PPO modes, a pure function: ``-kl_coef * KL_j`` (`"kl_only"`), plus
    the task advantage (`"mixed"`), clipped to ``+-clip``. Not detached: gradient flows through `kl`."""
    advantages = -kl_coef * kl
    if mode == "mixed":
        advantages = advantages + task_advantages
    return advantages.clamp(-clip, clip) if clip is not None else advantages


def constant_group_mask(
    rewards: torch.Tensor, num_generations: int, process_index: int = 0, num_processes: int = 1
) -> torch.Tensor:
    """One process's rows of the mask that is 1.0 for samples of groups whose rewards differ, 0.0 for groups with one
    constant reward.

    `rewards` `[N]` are the rewards of all processes, gathered in process order (contiguous groups of
    `num_generations`): a group may straddle two processes, whose rows are contiguous slices of `N / num_processes`.
    Returns the mask of rows ``[process_index * n, (process_index + 1) * n)``, ``n = N / num_processes``.
    """
    if rewards.ndim != 1 or len(rewards) % num_generations or len(rewards) % num_processes:
        raise ValueError(
            f"rewards must be the [N] rewards of all {num_processes} processes, N a multiple of num_generations "
            f"({num_generations}) and of the process count; got shape {tuple(rewards.shape)}."
        )
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}); got {process_index}.")
    groups = rewards.view(-1, num_generations)
    varied = (groups.max(dim=1).values - groups.min(dim=1).values) > 0
    n = len(rewards) // num_processes
    return varied.float().repeat_interleave(num_generations)[process_index * n : (process_index + 1) * n]


def gkd_loss(kl: torch.Tensor, kl_coef: float, keep: torch.Tensor) -> torch.Tensor:
    """Flow-OPD's `"gkd"` loss, ``kl_coef`` times the mean of the per-sample KL `[B]` over the samples `keep`
    (1.0/0.0, `[B]`) keeps: masked samples do not dilute it. 0, with zero gradient, when none is kept."""
    return kl_coef * (kl * keep).sum() / keep.sum().clamp(min=1.0)


class FlowOPDTrainer(ManifoldAnchorMixin, DanceGRPOTrainer):
    """Flow-OPD ([On-Policy Distillation for Flow Matching Models](https://huggingface.co/papers/2605.08063)):
    distil task teachers (LoRAs on the student's own base) into one student on the student's own SDE rollouts.

    Each sample is routed by its `task_column` value to its teacher. At every trained transition ``x_j -> x_{j+1}``
    of the rollout, the teacher's step from the same state, with the same conditioning, CFG scale and negative
    prompt, gives the per-step reward ``-KL_j(student || teacher)`` (the SDE-mean KL of Flow-GRPO), which
    `opd_mode` turns into the loss (see [`FlowOPDConfig`]). Manifold Anchor Regularization (`mar_coef`, from
    [`ManifoldAnchorMixin`]) adds the same KL to a task-agnostic anchor on every sample. Teachers are frozen named
    peft adapters on the one base transformer: no extra model copies.

    Example:

    ```python
    from peft import LoraConfig
    from flow_trl import FlowOPDConfig, FlowOPDTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

    trainer = FlowOPDTrainer(
        model=str(SHAPES_PIPELINE_DIR),
        args=FlowOPDConfig(output_dir="shapes-opd", task_column="tag", cold_start="merge"),
        reward_funcs="shapes",  # the task reward: logged and evaluated (and mixed in with opd_mode="mixed")
        train_dataset=shapes_dataset("train").filter(lambda r: r["tag"] in ("counting", "colors")),
        peft_config=LoraConfig(r=16, lora_alpha=32),
        teachers={"counting": "teachers/counting", "colors": "teachers/colors"},
    )
    trainer.train()
    ```

    Args: as [`DanceGRPOTrainer`] (a `peft_config` is required), plus
        teachers (`Mapping[str, str]`, *optional*): `{task: LoRA folder/file/Hub id}`; default `args.teachers`.
    """

    config_class = FlowOPDConfig
    _tag_names = ["flow-trl", "diffusers", "text-to-image", "opd", "distillation"]
    _name = "OPD"
    # docstyle-ignore
    _paper = {
        "title": "Flow-OPD: On-Policy Distillation for Flow Matching Models",
        "id": "2605.08063",
        "citation": textwrap.dedent("""\
            @article{flowopd2026,
                title   = {{Flow-OPD: On-Policy Distillation for Flow Matching Models}},
                author  = {Zhen Fang and Wenxuan Huang and Yu Zeng and Yunlong Lin and Shuang Chen and Kaituo Feng
                           and Lin Chen and Zehui Chen and Shaosheng Cao and Yiming Zhao and Feng Zhao},
                journal = {arXiv preprint arXiv:2605.08063},
                year    = {2026},
            }"""),
    }

    def __init__(
        self,
        model,
        args: FlowOPDConfig | None = None,
        reward_funcs=None,
        train_dataset=None,
        eval_dataset=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        teachers: Mapping[str, str] | None = None,
    ):
        teachers = parse_teachers(teachers if teachers is not None else getattr(args, "teachers", None))
        if not teachers:
            raise ValueError(
                "FlowOPDTrainer needs teachers: pass `teachers={task: lora_path}` or set `teachers` in the config "
                "(`--teachers task=path ...`). Train one LoRA per task first (e.g. `flow-trl grpo` on that task's "
                "prompts; on the shapes world `flow-trl opd` does it)."
            )
        if peft_config is None:
            raise ValueError(
                "FlowOPDTrainer loads the teachers as LoRA adapters on the student's base: pass a "
                "peft_config (a LoraConfig with the teachers' rank, alpha and targets)."
            )
        super().__init__(
            model,
            args=args,
            reward_funcs=reward_funcs,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        self.teachers = teachers  # resolved `{task: LoRA}`; `args.teachers` stays what the user gave
        if train_dataset is not None:
            self._check_routing(
                train_dataset[self.args.task_column] if self.args.task_column in train_dataset.column_names else None
            )
        # one adapter per distinct LoRA, however many tasks share it
        paths = list(dict.fromkeys(teachers.values()))
        self.teacher_adapters = [f"teacher_{k}" for k in range(len(paths))]
        self._teacher_of_task = {task: paths.index(path) for task, path in teachers.items()}
        for name, path in zip(self.teacher_adapters, paths):
            self.policies.load_adapter(path, name, purpose="A teacher")
        if self.args.cold_start == "merge":
            set_adapter_weights(self.transformer, merge_lora_adapters(paths, method="mean"))
        elif self.args.cold_start == "merge_deltas":
            config = self.transformer.peft_config["default"]
            set_adapter_weights(self.transformer, average_lora_deltas(paths, config.r, config.lora_alpha))
        elif self.args.init_adapter is not None:
            set_adapter_weights(self.transformer, read_lora(self.args.init_adapter)[0])

    def _check_routing(self, tasks: list | None) -> None:
        """Every task value must have a teacher (the column must exist)."""
        column = self.args.task_column
        if tasks is None:
            raise ValueError(
                f"The training dataset has no {column!r} column to route samples to teachers: add it or set "
                "task_column (the shapes world's family column is 'tag')."
            )
        missing = sorted({str(t) for t in tasks} - set(self.teachers))
        if missing:
            raise ValueError(
                f"No teacher for the {column!r} values {missing} (teachers: {sorted(self.teachers)}). Add a teacher "
                "for each (several tasks may share one LoRA) or filter those prompts out of the dataset."
            )

    def _generate_and_score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The rollout of [`DanceGRPOTrainer`], plus each sample's teacher index `teacher_ids` `[B]`."""
        tasks = [row.get(self.args.task_column) for row in rows]
        self._check_routing(None if None in tasks else tasks)
        inputs = super()._generate_and_score(rows)
        ids = torch.tensor([self._teacher_of_task[str(t)] for t in tasks], device=inputs["latents"].device)
        return {**inputs, "teacher_ids": ids}

    def _prepare_training_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        inputs = super()._prepare_training_inputs(inputs, generator)
        if self.args.filter_constant_reward_groups:
            # a process's rows need not be whole groups: mask on the rewards of all processes
            rewards = self.accelerator.gather(inputs["rewards"])
            keep = constant_group_mask(rewards, self.args.num_generations, self.accelerator.process_index,
                                       self.accelerator.num_processes)
            self._log_train_metrics({"opd/kept_frac": keep.mean()})
            inputs = {**inputs, "keep": keep}
        return inputs

    @torch.no_grad()
    def teacher_velocity(
        self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor], teacher_ids: torch.Tensor
    ) -> torch.Tensor:
        """Each sample's routed teacher's guided velocity at the same state, sigma and conditioning (the student's
        CFG scale and negative prompt)."""
        v = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device)
        for k, name in enumerate(self.teacher_adapters):
            idx = (teacher_ids == k).nonzero().squeeze(1)
            if len(idx):
                with self.policy(name) as teacher:
                    v[idx] = self.velocity(teacher, latents[idx], sigma[idx], index_conditioning(cond, idx))
        return v

    def _transition_loss(self, inputs: dict[str, Any], transition: Transition) -> tuple[torch.Tensor, dict]:
        """Flow-OPD's loss of one chunk: the per-step KL to the routed teacher as a PPO reward or minimised."""
        args, t = self.args, transition
        v_teacher = self.teacher_velocity(t.latents, t.sigma, t.cond, inputs["teacher_ids"][t.rows])
        kl = transition_kl(t, v_teacher)
        keep = inputs["keep"][t.rows] if "keep" in inputs else torch.ones_like(kl)
        metrics = {"opd/teacher_kl": kl.detach().mean()}
        if args.opd_mode == "gkd":
            return gkd_loss(kl, args.teacher_kl_coef, keep), metrics
        task = self._transition_advantages(inputs, t.rows, t.steps) if args.opd_mode == "mixed" else None
        advantages = opd_advantages(kl, args.opd_mode, args.teacher_kl_coef, task, args.advantage_clip) * keep
        loss, ppo_metrics = grpo_clip_loss(
            t.out.log_prob, inputs["log_probs"][t.rows, t.steps], advantages, args.clip_range
        )
        return loss, {**metrics, **ppo_metrics}


__all__ = ["FlowOPDTrainer", "constant_group_mask", "gkd_loss", "opd_advantages"]
