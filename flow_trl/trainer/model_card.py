"""The model card of a trained flow_trl model: `FlowRLTrainer.create_model_card` and its sample grid."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..hub import SAMPLE_GRID_NAME, card_hyperparameters, is_hub_id, render_model_card
from ..images import save_image_grid


class ModelCardMixin:
    """`create_model_card` for [`FlowRLTrainer`] (it reads the trainer's pipeline, adapter, config, rewards and log
    history): the card `push_to_hub` uploads and every `flow-trl` run writes, rendered by `flow_trl.hub`."""

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        evaluation: dict[str, float] | None = None,
        sample_image: str | os.PathLike | None = None,
        base_expr: str | None = None,
        base_import: str | None = None,
        **kwargs,
    ) -> None:
        """Write the model card (`README.md`) and its sample grid (`sample_grid.png`) into `output_dir`.

        Called by `push_to_hub`; call it yourself after `save_model` to publish the folder another way.

        Args:
            model_name: the card's title; the output folder's name by default.
            dataset_name: the training prompts' dataset id, listed in the metadata when it is a Hub id.
            tags: extra tags next to `flow-trl`, the algorithm and `lora`.
            evaluation: final figures to tabulate; the last `evaluate()` metrics by default. Remembered for later
                calls (so that `push_to_hub` keeps them).
            sample_image: an existing image to use as the sample grid; by default 8 fixed-seed samples of the
                trained policy on the eval (else train) prompts. Remembered like `evaluation`.
            base_expr, base_import: the Python expression the usage snippet loads the base pipeline from, and the
                import it needs, for a base that is not a Hub id (e.g. ``"str(MY_PIPELINE_DIR)"`` and ``"from
                my_package import MY_PIPELINE_DIR"``); a Hub base is loaded by its id. Remembered like `evaluation`.
        """
        if evaluation is not None:
            self._card_evaluation = dict(evaluation)
        if sample_image is not None:
            self._card_sample_image = str(sample_image)
        if base_expr is not None:
            self._card_base_source = {"base_expr": base_expr, "base_import": base_import}
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        grid = output_dir / SAMPLE_GRID_NAME
        source = getattr(self, "_card_sample_image", None)
        if source is not None:
            if Path(source).resolve() != grid.resolve():
                shutil.copyfile(source, grid)
        else:
            self._render_sample_grid(grid)
        model_name = model_name or output_dir.name
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or model_name
        weights = self.args.reward_weights or [1.0] * len(self.reward_funcs)
        card = render_model_card(
            model_name=model_name,
            repo_id=repo_id,
            base_model=self.base_model_id,
            algorithm=self._name,
            trainer_class=type(self).__name__,
            pipeline_class=type(self.pipe).__name__,
            is_lora=self.policies.writes_lora,
            rewards=list(zip(self.reward_func_names, weights)),
            hyperparameters=card_hyperparameters(self.args),
            paper=self._paper,
            evaluation=getattr(self, "_card_evaluation", None) or self._last_eval_metrics(),
            sample_image=SAMPLE_GRID_NAME,
            example_prompt=self._card_prompts(1)[0],
            global_step=self.state.global_step,
            tags=[t for t in self._tag_names if t not in ("diffusers", "text-to-image")]
            + ([tags] if isinstance(tags, str) else list(tags or [])),
            dataset_name=dataset_name,
            call_kwargs={"max_sequence_length": self.adapter.max_sequence_length},
            **getattr(self, "_card_base_source", {}),
        )
        card.save(output_dir / "README.md")

    @property
    def base_model_id(self) -> str | None:
        """The Hub id of the base pipeline (`None` when it was loaded from a local folder)."""
        name = getattr(self.pipe, "name_or_path", None)
        return name if is_hub_id(name) else None

    def _last_eval_metrics(self) -> dict[str, float]:
        for entry in reversed(self.state.log_history):
            metrics = {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
            if metrics:
                return metrics
        return {}

    def _card_prompts(self, n: int) -> list[str]:
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if dataset is None:
            return ["a photo of a cat"] * n
        prompts = list(dict.fromkeys(dataset["prompt"]))
        return [prompts[i % len(prompts)] for i in range(n)]

    @torch.no_grad()
    def _render_sample_grid(self, path: Path, num_images: int = 8) -> None:
        """ODE samples of the trained policy, one fixed seed per image (`eval_seed + i`), saved as a grid."""
        images = self.sample_with_seeds(self.transformer, self._card_prompts(num_images), list(range(num_images)),
                                        self.sigmas)
        save_image_grid(images.cpu(), path, ncols=min(4, num_images))

