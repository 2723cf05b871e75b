"""Logging callbacks adapted to diffusers models."""

from __future__ import annotations

import json

from transformers.integrations import TensorBoardCallback


class DiffusersTensorBoardCallback(TensorBoardCallback):
    """`TensorBoardCallback` for a diffusers model: its config is a plain dict (`FrozenDict`), which transformers'
    callback would call `to_json_string()` on. Writes the model config itself instead."""

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs.pop("model", None)
        super().on_train_begin(args, state, control, **kwargs)
        if self.tb_writer is not None and isinstance(getattr(model, "config", None), dict):
            self.tb_writer.add_text("model_config", json.dumps(dict(model.config), indent=2, default=str))


def use_diffusers_callbacks(callback_handler) -> None:
    """Replace transformers' `TensorBoardCallback` in a `CallbackHandler` by `DiffusersTensorBoardCallback`."""
    for i, callback in enumerate(callback_handler.callbacks):
        if type(callback) is TensorBoardCallback:
            callback_handler.callbacks[i] = DiffusersTensorBoardCallback(tb_writer=callback.tb_writer)
