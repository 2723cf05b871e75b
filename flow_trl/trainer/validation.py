"""Checks shared by the configs' `__post_init__`: one wording for every field's "must be one of" and sign errors."""

from __future__ import annotations

from collections.abc import Iterable


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
