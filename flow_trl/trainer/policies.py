"""`Policies`: the trained policy and the policies an algorithm keeps beside it, behind one API.

With a `peft_config` every policy is the same transformer with another LoRA adapter active: ``"default"`` is the
trained adapter, each extra policy (e.g. NFT's ``"old"``, AWM's ``"ema"``) a frozen adapter of the same shape, and
``"ref"`` the base model (adapters disabled); frozen adapters loaded from files (a MAR anchor, OPD teachers) are
policies too. Without one, the whole transformer is trained and ``"ref"`` and every extra policy are frozen full
copies made at the start. Trainers only ever call the methods below, so the two backends cannot drift apart.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..lora import (
    LORA_WEIGHTS_NAME,
    load_lora_adapter,
    lora_adapter_metadata,
    lora_from_weight_difference,
    with_default_targets,
)
from .outputs import TRANSFORMER_FOLDER
from .utils import eval_mode


TRAINED = "default"  # the trained policy (the peft adapter name diffusers saves and loads)
REFERENCE = "ref"  # the base model
TRAINABLE_STATE_FILE = "trainable_weights.safetensors"  # a `TrainedModule`'s LoRA and always-trained weights
_TRAINER_MARK = "_flow_trl_trainer"  # set on a pipeline's transformer by the trainer that prepared it for training


class Policies:
    """The trained policy (`"default"`), the base model (`"ref"`) and the algorithm's extra policies (`names`).

    Args:
        adapter: the model family adapter (`flow_trl.models.get_adapter`); its transformer is trained.
        names: the extra policies the algorithm keeps, each initialised to the trained policy.
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter (targets default to the family's);
            without it the transformer's `full_finetune_params` are trained.
        full_finetune_params: `"all"` or `"linear"` (the linear layers' weights), for full fine-tuning.
        lora_export_rank: with full fine-tuning, also save a LoRA of this rank of the weight difference to the base.
        owner: the trainer class setting the transformer up, recorded on it: a second trainer on the same
            transformer is refused.
    """

    def __init__(self, adapter, names: tuple[str, ...] = (), peft_config=None, full_finetune_params: str = "all",
                 lora_export_rank: int | None = None, owner: str = "Policies"):
        self.transformer: nn.Module = adapter.transformer
        previous = getattr(self.transformer, _TRAINER_MARK, None)
        if previous is not None:
            raise ValueError(
                f"This pipeline is already used by a {previous}, which set up its transformer for training (LoRA "
                "adapters or policy copies, frozen parameters); a second trainer would train on top of that. Give "
                "each trainer its own pipeline: load it again, pass the model path, or pass a `copy.deepcopy(pipe)` "
                "made before the first trainer."
            )
        self.names = tuple(names)
        self.is_lora = peft_config is not None
        self.lora_export_rank = lora_export_rank
        self._copies: dict[str, nn.Module] = {}  # full fine-tuning: the frozen copy of each non-trained policy
        self._lora_index: _LoraIndex | None = None  # LoRA: the adapter layers and weights, found once (`_lora`)
        if self.is_lora:
            if full_finetune_params != "all" or lora_export_rank is not None:
                raise ValueError(
                    "full_finetune_params and lora_export_rank apply to full fine-tuning; with a peft_config the "
                    "LoRA itself is trained and saved. Drop peft_config, or leave both at their defaults."
                )
            peft_config = with_default_targets(  # e.g. SD3's attention projections
                peft_config, adapter.default_lora_target_modules, adapter.unused_lora_modules()
            )
            self.transformer.requires_grad_(False)
            self.transformer.add_adapter(peft_config, adapter_name=TRAINED)
            for name in self.names:
                with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    self.transformer.add_adapter(copy.deepcopy(peft_config), adapter_name=name)
            self.activate(TRAINED)
            for name in self.names:
                self.copy(TRAINED, name)
        else:
            _set_full_finetune_params(self.transformer, full_finetune_params)
            for name in (*self.names, REFERENCE):
                self._copies[name] = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        setattr(self.transformer, _TRAINER_MARK, owner)

    # ---- switching and updating ----------------------------------------------------------------------------------

    def activate(self, name: str) -> None:
        """Make policy `name` the one the transformer computes (LoRA; full copies are separate modules). Only
        ``"default"`` is ever trainable.

        Costs nothing when `name` is already active, and otherwise touches only the adapter layers and LoRA weights
        (`_LoraIndex`), not every module and parameter of the transformer as diffusers' `set_adapter` does.
        """
        if not self.is_lora:
            return
        lora = self._lora()
        if lora.layers[0].active_adapters == [name]:
            return
        if name not in self.transformer.peft_config:
            raise ValueError(f"No adapter {name!r} on the transformer; its adapters are {list(lora.adapters)}.")
        for layer in lora.layers:
            layer.set_adapter(name)  # peft also marks the active adapter's weights trainable: undone below
        for param, trainable in lora.requires_grad:
            param.requires_grad_(trainable)

    def copy(self, source: str, target: str) -> None:
        """``target <- source`` for every policy weight."""
        self.soft_update(target, 0.0, source)

    @torch.no_grad()
    def soft_update(self, target: str, decay: float, source: str = TRAINED) -> None:
        """``target <- decay * target + (1 - decay) * source`` for every policy weight."""
        sources = self._parameters(source)
        for key, param in self._parameters(target).items():
            paired = key.replace(f".{target}.", f".{source}.") if self.is_lora else key
            param.lerp_(sources[paired], 1.0 - decay)

    def load_adapter(self, path: str | os.PathLike, name: str, purpose: str) -> None:
        """Load the LoRA file `path` as the frozen policy `name` (on the student's base; LoRA only), and keep the
        trained adapter active. `purpose` names what needs it, for the error without a LoRA."""
        if not self.is_lora:
            raise ValueError(f"{purpose} is a LoRA on the student's base: pass a peft_config (train a LoRA).")
        load_lora_adapter(self.transformer, path, name)
        self.activate(TRAINED)

    @contextmanager
    def policy(self, name: str, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Yield the module that computes policy `name`: ``"default"`` (`model`, e.g. a DDP wrapper, else the
        transformer), ``"ref"`` or another policy, the latter two in eval mode (frozen policies: no dropout)."""
        if name == TRAINED:
            yield model if model is not None else self.transformer
        elif not self.is_lora:
            yield self._copies[name]
        elif name == REFERENCE:
            layers = self._lora().layers
            for layer in layers:
                layer.enable_adapters(False)
            try:
                with eval_mode(self.transformer):
                    yield self.transformer
            finally:
                for layer in layers:
                    layer.enable_adapters(True)
        else:
            self.activate(name)
            try:
                with eval_mode(self.transformer):
                    yield self.transformer
            finally:
                self.activate(TRAINED)

    def to(self, device: torch.device | str) -> Policies:
        """Move the frozen copies (full fine-tuning) to `device`; adapters live in the transformer."""
        for module in self._copies.values():
            module.to(device)
        return self

    def _parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Policy `name`'s own weights (its adapter's, or its whole module's), in a fixed order."""
        if not self.is_lora:
            module = self.transformer if name == TRAINED else self._copies[name]
            return dict(module.named_parameters())
        return self._lora().parameters(name)

    def _lora(self) -> _LoraIndex:
        """The transformer's adapter layers and LoRA weights, indexed again whenever its set of adapters changed (an
        adapter added or loaded, here or by the user)."""
        adapters = tuple(self.transformer.peft_config)
        if self._lora_index is None or self._lora_index.adapters != adapters:
            self._lora_index = _LoraIndex(self.transformer, adapters)
        return self._lora_index

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The extra policies' weights (`names`), for a checkpoint: LoRA adapters under their peft names, full
        copies as ``<policy>.<parameter>``."""
        return {key: p.detach().clone().contiguous() for key, p in self._state_parameters().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "the state", owner: str = "this trainer"
                        ) -> None:
        """Inverse of `state_dict`; refuses a state of other policies or another LoRA configuration (`source` and
        `owner` name the file and the trainer in that error)."""
        params = self._state_parameters()
        if state.keys() != params.keys():
            differing = sorted(state.keys() ^ params.keys())[:3]
            raise ValueError(
                f"{source} does not hold the policies {owner} keeps ({self.names}; e.g. {differing} differ): it "
                "was saved by another trainer or LoRA configuration. Resume it with the trainer and peft_config that "
                "wrote it."
            )
        for key, param in params.items():
            param.copy_(state[key])

    def _state_parameters(self) -> dict[str, nn.Parameter]:
        """The extra policies' parameters by their name in `state_dict`."""
        return {(n if self.is_lora else f"{name}.{n}"): p
                for name in self.names for n, p in self._parameters(name).items()}

    @property
    def weights_name(self) -> str:
        """What `save_weights` writes the trained policy to: the LoRA file, or the transformer folder."""
        return LORA_WEIGHTS_NAME if self.is_lora else f"{TRANSFORMER_FOLDER}/"

    @property
    def writes_lora(self) -> bool:
        """Whether `save_weights` writes a LoRA file (the trained LoRA, or the exported weight difference)."""
        return self.is_lora or self.lora_export_rank is not None

    def save_weights(self, output_dir: str, pipeline_class: type) -> None:
        """Save the trained policy in diffusers format: a LoRA `load_lora_weights` accepts, or the transformer
        (plus, with `lora_export_rank`, the LoRA of its difference to the base)."""
        if self.is_lora:
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(self.transformer, adapter_name=TRAINED)
            metadata = lora_adapter_metadata(self.transformer.peft_config[TRAINED], lora)
        else:
            self.transformer.save_pretrained(os.path.join(output_dir, TRANSFORMER_FOLDER))
            if self.lora_export_rank is None:
                return
            lora, metadata = lora_from_weight_difference(
                self.transformer, self._copies[REFERENCE], self.lora_export_rank
            )
        pipeline_class.save_lora_weights(
            output_dir, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata
        )

    def load_weights(self, folder: str) -> None:
        """Load the trained policy `save_weights` wrote into `folder`."""
        if self.is_lora:
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            state = load_file(os.path.join(folder, LORA_WEIGHTS_NAME))
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            result = set_peft_model_state_dict(self.transformer, state, adapter_name=TRAINED)
            if result.unexpected_keys:
                raise ValueError(f"Checkpoint LoRA has unexpected keys: {result.unexpected_keys[:5]}")
            return
        from diffusers.models.modeling_utils import load_state_dict

        weights = os.path.join(folder, TRANSFORMER_FOLDER)
        state: dict[str, Any] = {}
        for f in os.listdir(weights):
            if f.endswith(".safetensors"):
                state.update(load_state_dict(os.path.join(weights, f)))
        self.transformer.load_state_dict(state)


class _LoraIndex:
    """What switching LoRA policies touches, found in one walk of the transformer: its peft adapter layers, each
    adapter's weights (`parameters`, in module order) and the trainability every LoRA weight keeps (only the trained
    adapter's)."""

    def __init__(self, transformer: nn.Module, adapters: tuple[str, ...]):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.adapters = adapters
        self.layers = [module for module in transformer.modules() if isinstance(module, BaseTunerLayer)]
        self._named = list(transformer.named_parameters())
        self.requires_grad = [(p, f".{TRAINED}." in n) for n, p in self._named if "lora_" in n]
        self._by_adapter: dict[str, dict[str, nn.Parameter]] = {}

    def parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s weights by their parameter name."""
        if name not in self._by_adapter:
            self._by_adapter[name] = {n: p for n, p in self._named if f".{name}." in n}
        return self._by_adapter[name]


def _set_full_finetune_params(transformer: nn.Module, which: str) -> None:
    """Make the parameters `full_finetune_params` names trainable: every one (`"all"`) or the weights of the linear
    layers only (`"linear"`, what `lora_from_weight_difference` can export)."""
    if which == "all":
        transformer.requires_grad_(True)
        return
    transformer.requires_grad_(False)
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            module.weight.requires_grad_(True)


class TrainedModule:
    """The weights trained on one module that is not a policy (e.g. the DRM): a LoRA, plus the parameters
    `always_trained` names by prefix (e.g. a new head), or, without a `peft_config`, every parameter.

    `merged()` is the module a user loads (the LoRA folded into the base weights); `save` and `load` write and read it
    with what resuming needs beyond it.
    """

    def __init__(self, module: nn.Module, peft_config=None, always_trained: tuple[str, ...] = ()):
        self.module, self.is_lora = module, peft_config is not None
        if self.is_lora:
            module.requires_grad_(False)
            module.add_adapter(peft_config)
            for name, param in module.named_parameters():
                if name.startswith(always_trained):
                    param.requires_grad_(True)

    def merged(self, module: nn.Module | None = None) -> nn.Module:
        """`module` (default: the trained one, e.g. a DDP-unwrapped view of it) as a plain module: itself without a
        LoRA, else a new module of its class with the LoRA merged into the base weights."""
        module = module if module is not None else self.module
        if not self.is_lora:
            return module
        merged = type(module).from_config(module.config).to(module.dtype)
        merged.load_state_dict(merged_state_dict(module))
        return merged.to(module.device)

    def save(self, output_dir: str, module: nn.Module | None = None) -> None:
        """`save_pretrained` of the merged module, and with a LoRA its trainable weights (`TRAINABLE_STATE_FILE`),
        which resuming needs: the merged weights cannot be split back into base and LoRA."""
        self.merged(module).save_pretrained(output_dir)
        if self.is_lora:
            from safetensors.torch import save_file

            trainable = {n: p.detach().contiguous() for n, p in self.module.named_parameters() if p.requires_grad}
            save_file(trainable, os.path.join(output_dir, TRAINABLE_STATE_FILE))

    def load(self, folder: str) -> None:
        """Restore what `save` wrote to `folder` (a checkpoint) into the trained module."""
        if not self.is_lora:
            self.module.load_state_dict(type(self.module).from_pretrained(folder).state_dict())
            return
        from safetensors.torch import load_file

        path = os.path.join(folder, TRAINABLE_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {folder} was not saved by a LoRA run; resume without a "
                                    "peft_config, or from a checkpoint of this run.")
        result = self.module.load_state_dict(load_file(path), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"Checkpoint has unexpected keys: {result.unexpected_keys[:5]}")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA layer merged into its base weight (keys as without LoRA)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)
                key = f"{name}.base_layer.weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = (value + deltas[key].to(value.dtype)) if key in deltas else value
    return state


__all__ = ["REFERENCE", "TRAINED", "Policies", "TrainedModule", "merged_state_dict"]
