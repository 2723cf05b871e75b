"""Model cards for trained adapters: rendered from `flow_trl/model_cards/trained_model.md` with `huggingface_hub`.

The card carries the Hub metadata that makes the repo discoverable and loadable (`base_model`,
`library_name: diffusers`, `pipeline_tag: text-to-image`, tags `flow-trl`, the algorithm and `lora`), the algorithm and
its citation, the rewards and their weights, the hyperparameters, the final evaluation figures, a sample grid and a
usage snippet. Nothing secret is written: every field whose name ends in ``_token`` is left out.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


MODEL_CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "trained_model.md"
SAMPLE_GRID_NAME = "sample_grid.png"
# TrainingArguments fields worth recording next to the algorithm's own fields
_TRAINING_FIELDS = (
    "learning_rate", "lr_scheduler_type", "weight_decay", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_grad_norm", "seed", "bf16", "fp16",
)


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id (``org/name`` or ``name``) rather than a local path."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    return name.count("/") <= 1


def card_hyperparameters(args) -> dict[str, Any]:
    """The config values worth publishing: flow_trl's own fields plus the main optimisation settings, no secrets."""
    from transformers import TrainingArguments

    base_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    names = [f.name for f in dataclasses.fields(args) if f.name not in base_fields] + list(_TRAINING_FIELDS)
    return {name: getattr(args, name) for name in names if not name.endswith("_token") and not name.startswith("_")}


def framework_versions() -> dict[str, str]:
    versions = {}
    for package in ("flow-trl", "diffusers", "transformers", "peft", "torch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def render_model_card(
    *,
    model_name: str,
    repo_id: str,
    algorithm: str,
    trainer_class: str,
    pipeline_class: str,
    is_lora: bool,
    rewards: list[tuple[str, float]],
    hyperparameters: dict[str, Any],
    base_model: str | None = None,
    paper: dict[str, str] | None = None,
    evaluation: dict[str, float] | None = None,
    sample_image: str | None = None,
    example_prompt: str = "a photo of a cat",
    global_step: int = 0,
    tags: list[str] | None = None,
    dataset_name: str | None = None,
    base_expr: str | None = None,
    base_import: str | None = None,
    call_kwargs: dict[str, Any] | None = None,
) -> ModelCard:
    """The model card of a trained model, rendered from `MODEL_CARD_TEMPLATE`.

    Args:
        algorithm: the algorithm's short name (e.g. ``"NFT"``); its lower-case form becomes a tag.
        rewards: ``(reward function name, weight)`` pairs.
        hyperparameters: config values to list (see `card_hyperparameters`); keys ending in ``_token`` are dropped.
        base_model: the Hub id of the base pipeline; written as ``base_model`` metadata when given.
        paper: ``{"title", "id" (arXiv), "citation" (BibTeX)}`` of the algorithm.
        evaluation: final metrics to tabulate.
        sample_image: a path relative to the card (e.g. ``"sample_grid.png"``).
        base_expr, base_import: the Python expression the usage snippet loads the base pipeline from (and the import
            it needs) when the base is not a Hub id, e.g. ``"str(SHAPES_PIPELINE_DIR)"``.
        call_kwargs: extra keyword arguments of the pipeline call in the usage snippet (e.g. the text length used in
            training).
    """
    paper = paper or {}
    card_tags = ["flow-trl", algorithm.lower(), *(["lora"] if is_lora else []), "text-to-image", "diffusers"]
    card_tags += [t for t in tags or [] if t not in card_tags]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=card_tags,
        datasets=[dataset_name] if dataset_name and is_hub_id(dataset_name) else None,
    )
    guidance = hyperparameters.get("guidance_scale", 1.0)
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        algorithm=algorithm,
        trainer_class=trainer_class,
        pipeline_class=pipeline_class,
        is_lora=is_lora,
        rewards=rewards,
        hyperparameters={k: v for k, v in hyperparameters.items() if not k.endswith("_token")},
        evaluation={k: (round(v, 4) if isinstance(v, float) else v) for k, v in (evaluation or {}).items()},
        sample_image=sample_image,
        example_prompt=example_prompt,
        base_expr=base_expr or (f'"{base_model}"' if base_model else '"<base model id or path>"'),
        base_import=base_import,
        call_kwargs=call_kwargs or {},
        num_inference_steps=hyperparameters.get("num_inference_steps", 28),
        guidance_scale=guidance,
        global_step=global_step,
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
        citation=paper.get("citation"),
        versions=framework_versions(),
    )


__all__ = ["MODEL_CARD_TEMPLATE", "SAMPLE_GRID_NAME", "card_hyperparameters", "is_hub_id", "render_model_card"]
