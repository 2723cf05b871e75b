"""Model adapters: one per pipeline family, picked from the pipeline's class."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .base import Conditioning, FlowModelAdapter, cat_conditioning, index_conditioning
from .flux import FluxAdapter
from .flux2 import Flux2KleinAdapter
from .packed import PackedLatentAdapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter


ADAPTERS: tuple[type[FlowModelAdapter], ...] = (SD3Adapter, FluxAdapter, Flux2KleinAdapter, QwenImageAdapter)


def get_adapter(pipe, max_sequence_length: int | None = None, decode_batch_size: int | None = 16) -> FlowModelAdapter:
    """The adapter for `pipe`, chosen by its class (or a parent class) name (arguments: see `FlowModelAdapter`).

    Raises:
        ValueError: for a pipeline family flow_trl does not support, listing the supported ones.
    """
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for adapter_cls in ADAPTERS:
        if any(name in adapter_cls.pipeline_class_names for name in names):
            return adapter_cls(pipe, max_sequence_length=max_sequence_length, decode_batch_size=decode_batch_size)
    supported = sorted(n for a in ADAPTERS for n in a.pipeline_class_names)
    raise ValueError(
        f"{type(pipe).__name__} is not supported by flow_trl. Supported pipelines: {', '.join(supported)}. "
        "Pass a model id/path or a pipeline object of one of these classes."
    )


def load_pipeline(model: str | os.PathLike | Any, model_init_kwargs: dict[str, Any] | None = None):
    """A pipeline from a Hub id or local path (`DiffusionPipeline.from_pretrained`), or `model` itself."""
    if isinstance(model, (str, os.PathLike)):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model, **(model_init_kwargs or {}))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if model_init_kwargs:
        raise ValueError("`model_init_kwargs` only applies when `model` is a model id or path, not a pipeline object.")
    return model


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' loading bars (pipeline components, weights) while models load; the
    training progress bar is unaffected."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for module in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in enabled:
            module.enable_progress_bar()


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "FlowModelAdapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "PackedLatentAdapter",
    "QwenImageAdapter",
    "SD3Adapter",
    "cat_conditioning",
    "get_adapter",
    "index_conditioning",
    "load_pipeline",
    "quiet_loading",
]
