"""LoRA: default targets of a peft config, and diffusers-format LoRA files (read, merge for the cold start of
on-policy distillation, load as named peft adapters, export a full fine-tune's linear-weight changes as one).

A LoRA file is what `FlowRLTrainer._save` writes (and `pipe.load_lora_weights` reads): a
`pytorch_lora_weights.safetensors` whose keys are ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and
whose safetensors metadata carries the peft config (``lora_adapter_metadata``, keys prefixed ``transformer.``).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn


if TYPE_CHECKING:
    from peft import LoraConfig


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
MERGE_METHODS = ("mean", "weighted", "sum")


def with_default_targets(
    peft_config: LoraConfig, target_modules: Iterable[str], unused_modules: Iterable[str] = ()
) -> LoraConfig:
    """`peft_config` as given when it names its targets; otherwise a copy targeting the model's defaults.

    The defaults are `target_modules` (e.g. a family's attention projections) minus `unused_modules`, the default
    targets whose output never reaches the model's prediction: an adapter there would get no gradient, stay at its
    initialisation and make DDP fail without ``find_unused_parameters``. Explicit targets are the user's choice and
    are left alone.
    """
    if peft_config.target_modules is not None:
        return peft_config
    peft_config = copy.deepcopy(peft_config)
    peft_config.target_modules = set(target_modules)
    peft_config.exclude_modules = list(unused_modules) or None
    return peft_config


def lora_adapter_metadata(peft_config: LoraConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, object]:
    """The peft config of a LoRA file (`transformer_lora_adapter_metadata`), targeting exactly its modules.

    `load_lora_weights` rebuilds the `LoraConfig` from this metadata, and peft warns about every module the config
    targets that has no weights in the file. So the targets are the concrete names of the modules in `state_dict`
    (peft-format keys, ``<module>.lora_A.weight``), not the patterns the adapter was created with, which can match
    modules an ``exclude_modules`` list left out. The file also carries ``lora_alpha``: without it diffusers assumes
    ``alpha = r`` and rescales the LoRA.
    """
    metadata = peft_config.to_dict()
    metadata["target_modules"] = sorted({key.rsplit(".lora_", 1)[0] for key in state_dict})
    metadata.pop("exclude_modules", None)
    return metadata


def lora_file(path: str | os.PathLike) -> Path:
    """The weights file of a LoRA given as a file, a folder holding `pytorch_lora_weights.safetensors`, or a Hub id."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / LORA_WEIGHTS_NAME).is_file():
        return path / LORA_WEIGHTS_NAME
    if path.exists() or path.is_absolute() or str(path).count("/") != 1:
        raise FileNotFoundError(f"No {LORA_WEIGHTS_NAME} in {path}: pass a LoRA folder or file saved by flow_trl.")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(path), LORA_WEIGHTS_NAME))


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a diffusers-format LoRA and its safetensors metadata (`{}` when it has none)."""
    from safetensors import safe_open

    file = lora_file(path)
    with safe_open(str(file), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def merge_lora_adapters(
    paths: list[str | os.PathLike],
    weights: list[float] | None = None,
    method: str = "mean",
    output_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Merge LoRA adapters factor by factor: every ``lora_A`` and ``lora_B`` matrix is combined element-wise.

    `"mean"` averages, `"weighted"` uses `weights` normalised to sum 1, `"sum"` adds (Flow-OPD's `scripts/merge.py`).
    This averages the factors (A, B), not the low-rank products ``B @ A``: ``mean(B) @ mean(A)`` differs from
    ``mean(B @ A)`` by cross terms. It is what Flow-OPD's cold start does, and it keeps the result a LoRA of the same
    rank that the student trains further (the exact average of the products would need rank ``n * r``).

    Args:
        paths: LoRA folders/files/Hub ids with identical keys and shapes (same base model, targets and rank).
        weights: one weight per path, for `"weighted"` (also accepted for `"mean"`/`"sum"` only if unset).
        method: `"mean"`, `"weighted"` or `"sum"`.
        output_dir: where to write the merged `pytorch_lora_weights.safetensors` (the first adapter's metadata).

    Returns:
        The merged tensors, keyed as in the files.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}; got {method!r}.")
    if len(paths) < 1:
        raise ValueError("merge_lora_adapters needs at least one LoRA path.")
    if (weights is None) == (method == "weighted"):
        raise ValueError("Pass `weights` (one per path) exactly when method='weighted'.")
    if method == "weighted":
        if len(weights) != len(paths) or sum(weights) <= 0 or min(weights) < 0:
            raise ValueError(f"weights must be {len(paths)} non-negative values with a positive sum; got {weights}.")
        coefs = [w / sum(weights) for w in weights]
    else:
        coefs = [1.0 / len(paths) if method == "mean" else 1.0] * len(paths)
    loras = [read_lora(p) for p in paths]
    first, metadata = loras[0]
    for path, (state, _) in zip(paths[1:], loras[1:]):
        _check_same_layout(first, state, f"{paths[0]}", f"{path}")
    merged = {
        key: sum(c * state[key].float() for c, (state, _) in zip(coefs, loras)).to(first[key].dtype) for key in first
    }
    if output_dir is not None:
        _save_lora(merged, output_dir, metadata)
    return merged


def _save_lora(state: dict[str, torch.Tensor], output_dir: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write `state` as `output_dir/pytorch_lora_weights.safetensors` with `metadata` (what `read_lora` gives)."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(output_dir, LORA_WEIGHTS_NAME), metadata=metadata or None)


def saved_lora_alpha(metadata: dict[str, str]) -> float | None:
    """The ``lora_alpha`` a LoRA file's metadata records (diffusers prefixes it ``transformer.``), or None."""
    saved = json.loads(metadata.get(LORA_METADATA_KEY, "{}"))
    return saved.get("transformer.lora_alpha", saved.get("lora_alpha"))


def lora_shape(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, float, list[str]]:
    """``(rank, lora_alpha, modules)`` of a LoRA file as `read_lora` returns it: alpha is ``rank`` when the metadata
    has none (as diffusers assumes), modules are the adapted module names without the ``transformer.`` prefix."""
    rank = next(t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight"))
    alpha = saved_lora_alpha(metadata)
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state})
    return rank, float(rank if alpha is None else alpha), modules


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of rank `rank` with ``lora_B @ lora_A`` the best rank-`rank` approximation of `delta`
    (truncated SVD, Eckart-Young; exact when `rank` reaches ``min(delta.shape)``, zero-padded above it); the singular
    values are split evenly between the factors."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    lora_b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    lora_a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    lora_b[:, :r] = u[:, :r] * root
    lora_a[:r] = root[:, None] * vh[:r]
    return lora_a, lora_b


def average_lora_deltas(
    paths: list[str | os.PathLike], rank: int, lora_alpha: float, output_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The LoRA of rank `rank` and alpha `lora_alpha` whose weight change is the mean of the adapters' changes.

    Each adapter's change of a module is ``(alpha_k / r_k) B_k @ A_k``; their mean is factored again by truncated SVD
    (`low_rank_factors`), so the result is the model soup of the adapters (the average of their weights), exactly
    when `rank` reaches each module's smaller dimension. Unlike `merge_lora_adapters` (which averages the factors, as
    Flow-OPD's cold start does) this is meaningful for adapters whose factors come from separate decompositions, e.g.
    full fine-tunes exported with `lora_from_weight_difference`.

    Args:
        paths: LoRA folders/files/Hub ids adapting the same modules of the same base model (ranks may differ).
        rank: rank of the result (the adapter it initialises).
        lora_alpha: alpha of that adapter (the factors are scaled so that its peft scale ``alpha / rank`` applies).
        output_dir: where to write the result's `pytorch_lora_weights.safetensors` (the first adapter's metadata
            with `rank` and `lora_alpha`).

    Returns:
        Peft-format tensors (``<module>.lora_A.weight`` / ``lora_B.weight``, keys as in the first file).
    """
    if not paths:
        raise ValueError("average_lora_deltas needs at least one LoRA path.")
    loras = [read_lora(p) for p in paths]
    shapes = [lora_shape(state, meta) for state, meta in loras]
    modules = shapes[0][2]
    for path, (_, _, other) in zip(paths[1:], shapes[1:]):
        if other != modules:
            raise ValueError(
                f"The LoRA {path} does not adapt the same modules as {paths[0]}: "
                f"{sorted(set(modules) ^ set(other))[:3]} differ. Use adapters of the same base model and targets."
            )
    states = [{k.removeprefix("transformer."): v for k, v in state.items()} for state, _ in loras]
    prefix = "transformer." if any(k.startswith("transformer.") for k in loras[0][0]) else ""  # the first file's keys
    root = (rank / lora_alpha) ** 0.5  # scale * B @ A = delta with B, A each carrying 1 / sqrt(scale)
    merged: dict[str, torch.Tensor] = {}
    for module in modules:
        a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        deltas = [al / r * st[b].double() @ st[a].double() for st, (r, al, _) in zip(states, shapes)]
        lora_a, lora_b = low_rank_factors(sum(deltas) / len(deltas), rank)
        dtype = states[0][a].dtype
        merged[prefix + a] = (lora_a * root).to(dtype).contiguous()
        merged[prefix + b] = (lora_b * root).to(dtype).contiguous()
    if output_dir is not None:
        config = json.loads(loras[0][1].get(LORA_METADATA_KEY, "{}"))  # the first adapter's, at the new rank
        new = {"r": rank, "lora_alpha": lora_alpha}
        config = {k: new.get(k.removeprefix("transformer."), v) for k, v in config.items()}
        _save_lora(merged, output_dir, {**loras[0][1], LORA_METADATA_KEY: json.dumps(config)})
    return merged


def _check_same_layout(
    reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor], reference_name: str, other_name: str
) -> None:
    """Same keys and shapes, or a clear error naming what differs (targets, rank or base model)."""
    missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if missing or extra:
        raise ValueError(
            f"The LoRA {other_name} does not target the same modules as {reference_name}: missing {missing[:3]}, "
            f"unexpected {extra[:3]}. Train both with the same base model and lora target modules."
        )
    shapes = [
        (k, tuple(reference[k].shape), tuple(other[k].shape))
        for k in reference
        if reference[k].shape != other[k].shape
    ]
    if shapes:
        key, a, b = shapes[0]
        raise ValueError(
            f"The LoRA {other_name} has other shapes than {reference_name} (e.g. {key}: {b} vs {a}): a different "
            "rank or base model. Use the same base model and LoRA rank for both."
        )


def load_lora_adapter(
    transformer: nn.Module, path: str | os.PathLike, adapter_name: str, like: str = "default"
) -> None:
    """Load a diffusers-format LoRA into `transformer` as the frozen peft adapter `adapter_name`.

    The adapter gets the config of adapter `like` (the student's); the file must adapt exactly the same modules
    with the same shapes and `lora_alpha`, else a `ValueError` says what differs. No copy of the base weights is
    made: it is one more pair of LoRA factors per adapted module.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state, metadata = read_lora(path)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    expected = get_peft_model_state_dict(transformer, adapter_name=like)
    _check_same_layout(expected, state, f"the student's adapter ({like!r})", str(path))
    config = copy.deepcopy(transformer.peft_config[like])
    alpha = saved_lora_alpha(metadata)
    if alpha is not None and alpha != config.lora_alpha:
        raise ValueError(
            f"The LoRA {path} was trained with lora_alpha={alpha}, the student uses {config.lora_alpha}: set the "
            "student's lora_alpha (and rank) to the adapter's."
        )
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(config, adapter_name=adapter_name)
    set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    for name, param in transformer.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)


def lora_from_weight_difference(
    trained: nn.Module, base: nn.Module, rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """A LoRA that turns `base` into `trained`, when the two differ only in the weights of their linear layers.

    For each `nn.Linear` whose weight changed, ``delta = W_trained - W_base = U S V^T`` (SVD) gives
    ``lora_B = U_r S_r^(1/2)`` and ``lora_A = S_r^(1/2) V_r^T`` with ``r = min(rank, min(delta.shape))``, zero-padded
    to `rank` so that every module has the same rank; ``lora_alpha = rank`` makes peft's scale 1, so
    ``lora_B @ lora_A = delta`` exactly when `rank` reaches the layer's smaller dimension and is its best rank-`rank`
    approximation (Eckart-Young) below that. Unchanged layers get no LoRA.

    Args:
        trained: the fine-tuned module (e.g. a transformer trained with `full_finetune_params="linear"`).
        base: the module it was fine-tuned from (same architecture).
        rank: the LoRA rank.

    Returns:
        ``(state_dict, lora_config)``: peft-format tensors (``<module>.lora_A.weight`` / ``lora_B.weight``, what
        `pipe.save_lora_weights(transformer_lora_layers=...)` takes) and its `transformer_lora_adapter_metadata`
        (`lora_adapter_metadata`).

    Raises:
        ValueError: if a parameter other than a linear weight differs (a bias, a norm, an embedding): a LoRA cannot
            carry it.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1; got {rank}.")
    base_params = dict(base.named_parameters())
    linear_weights = {f"{name}.weight" for name, m in trained.named_modules() if isinstance(m, nn.Linear)}
    for name, param in trained.named_parameters():
        if name not in base_params or base_params[name].shape != param.shape:
            raise ValueError(f"`trained` and `base` differ in architecture at {name!r}; pass the model it came from.")
        if name not in linear_weights and not torch.equal(param.detach(), base_params[name].detach()):
            raise ValueError(
                f"{name!r} changed, and only the weights of linear layers can be exported as a LoRA. Fine-tune with "
                "full_finetune_params='linear' to train just those."
            )
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in trained.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            delta = module.weight.double() - base_params[f"{name}.weight"].double()
            if not delta.any():
                continue
            lora_a, lora_b = low_rank_factors(delta, rank)
            dtype = module.weight.dtype
            state[f"{name}.lora_A.weight"] = lora_a.to(dtype).contiguous()
            state[f"{name}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    if not state:
        raise ValueError("`trained` has the same linear weights as `base`: there is no LoRA to export.")
    from peft import LoraConfig

    return state, lora_adapter_metadata(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False), state)


def set_adapter_weights(transformer: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Overwrite adapter `adapter_name` with diffusers-format LoRA tensors (e.g. a merged cold start)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    _check_same_layout(
        get_peft_model_state_dict(transformer, adapter_name=adapter_name),
        state,
        f"the adapter {adapter_name!r}",
        "the given weights",
    )
    set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)


__all__ = [
    "LORA_WEIGHTS_NAME",
    "average_lora_deltas",
    "load_lora_adapter",
    "lora_adapter_metadata",
    "lora_from_weight_difference",
    "low_rank_factors",
    "lora_shape",
    "merge_lora_adapters",
    "read_lora",
    "set_adapter_weights",
    "with_default_targets",
]
