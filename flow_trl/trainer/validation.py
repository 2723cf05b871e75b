"""Checks shared by the configs' `__post_init__` (one wording for every field's "must be one of" and sign errors)
and the trainers' dataset checks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise a `ValueError` naming the valid values unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def check_positive(name: str, value: float | None, optional: bool = False) -> None:
    """Raise a `ValueError` unless `value > 0` (or `value is None` when the field is `optional`)."""
    if optional and value is None:
        return
    if not value > 0:
        raise ValueError(f"{name} must be positive{' or None' if optional else ''}; got {value}.")


def check_non_negative(name: str, value: float) -> None:
    """Raise a `ValueError` unless `value >= 0` (NaN included: it compares false)."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0; got {value}.")


def check_datasets(train_dataset: Any, eval_dataset: Any) -> None:
    """Refuse prompt datasets without a `prompt` column."""
    if train_dataset is not None and "prompt" not in train_dataset.column_names:
        raise ValueError(
            f"The training dataset needs a 'prompt' column; its columns are {train_dataset.column_names}. "
            "Rename your text column with `dataset.rename_column(old, 'prompt')`."
        )
    if eval_dataset is not None and "prompt" not in eval_dataset.column_names:
        raise ValueError(f"The eval dataset needs a 'prompt' column; its columns are {eval_dataset.column_names}.")


def warn_if_never_evaluated(args: Any, eval_dataset: Any) -> None:
    """Warn when training is about to start with an `eval_dataset` that `eval_strategy="no"` never evaluates."""
    if eval_dataset is not None and args.eval_strategy == "no":
        warnings.warn(
            "An eval_dataset was given but eval_strategy is 'no' (transformers' default), so training never "
            "evaluates it; only explicit trainer.evaluate() calls do. Set eval_strategy='steps' and eval_steps to "
            "evaluate during training.",
            stacklevel=3,
        )
