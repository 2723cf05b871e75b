"""Seconds per training iteration by phase, the overhead above pure transformer compute, start-up and peak memory.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --trainer nft     # the side-by-side geometry (below)
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --trainer grpo
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --trainer nft --model sd35-medium --resolution 256 \\
        --prompts 1 --group 2 --steps 2 --gradient_checkpointing --warmup 0 --iterations 1 --no-pure_compute
    python benchmarks/throughput.py --memory_table           # expected GPU memory per model x resolution x LoRA/full

On a GPU (an H100 or larger; bf16, the real depth of both architectures, 2 iterations after a warm-up):

    python benchmarks/throughput.py --device cuda --precision bf16 --trainer nft --model sd35-medium \\
        --resolution 512 --prompts 2 --group 4 --steps 10 --gradient_checkpointing --iterations 2
    python benchmarks/throughput.py --device cuda --precision bf16 --trainer grpo --model sd35-medium \\
        --resolution 512 --prompts 2 --group 4 --steps 10 --gradient_checkpointing --iterations 2
    python benchmarks/throughput.py --device cuda --precision bf16 --trainer nft --model flux-dev \\
        --resolution 512 --prompts 1 --group 2 --steps 10 --gradient_checkpointing --iterations 2
    python benchmarks/throughput.py --memory_table --device cuda  # the activation parts measured on the GPU

Default geometry (the one of the Flow-Factory comparison in docs/benchmarks.md): the shapes pipeline at its native
64 px, 4 prompts x group 4 = 16 images per rollout, 10 sampling steps, LoRA r32 (alpha 64) on the 8 attention
projections, fp32; one rollout and one optimizer step per iteration (`--micro_batch` images per backward; all 16 by
default), the trainer's other defaults (`--set FIELD=VALUE` changes any config field, e.g. `--set beta=0`).

Phases (disjoint, so they add up to at most the iteration): `rollout_forward` (transformer calls while sampling),
`text_encode`, `decode` (VAE), `reward`, `train_forward` (transformer calls with gradient), `policy_forward`
(transformer calls without gradient during training: NFT's old policy, the reference), `backward`, `optimizer`
(`optimizer.step`), and `rest` (the iteration minus all of them: sampling math, policy switching, losses, metrics,
gradient clipping, batching). An iteration runs from `on_step_begin` to `on_step_end`. On CUDA every phase boundary
synchronises the device, so the split is exact but the iteration is a little slower than without this script.

Pure transformer compute: every transformer call of the measured iterations is recorded with forward hooks (its
inputs' shapes and dtypes, gradient mode, autocast dtype and active LoRA adapters), then after training each recorded
call is replayed as many times as it happened, in a tight loop on the same module with the same input tensors and
adapter state, and each call made with gradient is followed by its backward (a fixed random cotangent of the output's
shape; gradient checkpointing as in training). `overhead_ratio` = iteration seconds / pure compute seconds: 1.0 would
mean the trainer adds nothing around the transformer (VAE, rewards and the text encoders count as overhead).

Start-up: from the process's creation (as the OS records it) to the first iteration's `on_step_begin`. Peak memory:
the process's peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA, both read right after the last iteration.
Prints a table and writes everything as JSON (`--output_json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


PHASES = ("rollout_forward", "text_encode", "decode", "reward", "train_forward", "policy_forward", "backward",
          "optimizer", "rest")
TRAINERS = {"nft": ("FlowNFTTrainer", "FlowNFTConfig"), "grpo": ("DanceGRPOTrainer", "DanceGRPOConfig"),
            "awm": ("FlowAWMTrainer", "FlowAWMConfig")}
MODELS = ("shapes", "sd35-medium", "flux-dev")
ATTENTION_PROJECTIONS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
MEMORY_RESOLUTIONS = (512, 1024)


def process_start_time() -> float:
    """The Unix time at which the OS created this process."""
    import psutil

    return psutil.Process().create_time()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--trainer", choices=sorted(TRAINERS), default="nft", help="Algorithm to time.")
    add("--model", choices=MODELS, default="shapes",
        help="The shipped shapes pipeline, or a random-weight real-size architecture (benchmarks/architectures.py).")
    add("--num_layers", type=int, help="Architectures only: joint/double blocks (real widths at reduced depth).")
    add("--num_single_layers", type=int, help="flux-dev only: single-stream blocks (default 2 x --num_layers).")
    add("--resolution", type=int, help="Image side in pixels (the pipeline's native one if unset).")
    add("--prompts", type=int, default=4, help="Prompts per rollout.")
    add("--group", type=int, default=4, help="Images per prompt (num_generations).")
    add("--micro_batch", type=int, help="Images per backward (per_device_train_batch_size); all of them if unset.")
    add("--steps", type=int, default=10, help="Sampling steps (num_inference_steps).")
    add("--precision", choices=("fp32", "bf16"), default="fp32",
        help="bf16: the pipeline in bf16 and bf16=True (autocast); fp32: neither.")
    add("--lora_rank", type=int, default=32, help="LoRA rank (alpha = 2 x rank); 0: full fine-tuning.")
    add("--lora_targets", nargs="+", default=ATTENTION_PROJECTIONS, help="Modules the LoRA adapts.")
    add("--gradient_checkpointing", action="store_true", help="Checkpoint the transformer blocks.")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="Where to train.")
    add("--warmup", type=int, default=1, help="Iterations run first and not counted.")
    add("--iterations", type=int, default=3, help="Iterations measured.")
    add("--pure_compute", action=argparse.BooleanOptionalAction, default=True,
        help="Replay the recorded transformer calls to measure the overhead ratio (doubles the transformer time).")
    add("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Other config fields (YAML values).")
    add("--output_json", help="Where to write the results (default: throughput-<trainer>-<model>.json).")
    add("--memory_table", action="store_true",
        help="Instead of timing: measure the parts of the memory model and print expected GPU memory (bf16).")
    args = parser.parse_args(argv)
    for flag in ("prompts", "steps", "iterations"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1.")
    if args.group < 2:
        parser.error("--group must be at least 2 (group-relative advantages).")
    if args.model == "shapes" and (args.num_layers or args.num_single_layers):
        parser.error("--num_layers/--num_single_layers apply to --model sd35-medium or flux-dev.")
    return args


# ---- timing ---------------------------------------------------------------------------------------------------


class PhaseClock:
    """Seconds per phase of the current iteration; synchronises CUDA at every boundary so the times are the work's."""

    def __init__(self, device: str):
        import torch

        self.synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    def now(self) -> float:
        self.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - start

    def timed(self, name: str, func: Callable) -> Callable:
        """`func`, with its calls counted in phase `name`."""

        def wrapper(*args, **kwargs):
            with self.phase(name):
                return func(*args, **kwargs)

        return wrapper


class TimedReward:
    """A reward function whose calls are counted in the `reward` phase (same logging name as the wrapped one)."""

    def __init__(self, func: Callable, clock: PhaseClock):
        from flow_trl.rewards import reward_func_name

        self.func, self.clock, self.name = func, clock, reward_func_name(func)

    def __call__(self, prompts, images, **kwargs):
        with self.clock.phase("reward"):
            return self.func(prompts, images, **kwargs)


def brightness(prompts, images, **kwargs):
    """Mean pixel value: a continuous reward for the random-weight architectures (the shapes reward would be 0)."""
    return images.mean(dim=(1, 2, 3))


def _lora_state(module) -> tuple[tuple[str, ...], bool] | None:
    """(active adapters, adapters disabled) of `module`'s first LoRA layer; None without LoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            return tuple(layer.active_adapters), bool(layer.disable_adapters)
    return None


def _set_lora_state(module, state: tuple[tuple[str, ...], bool] | None) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if state is None:
        return
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter(list(state[0]))
            layer.enable_adapters(not state[1])


class TransformerCalls:
    """Forward hooks on every module that computes a policy: times each call into a phase and records it (one copy
    of the inputs per distinct signature, and how often it happened in measured iterations) for the replay."""

    def __init__(self, modules, clock: PhaseClock):
        self.clock = clock
        self.in_rollout = False
        self.recording = False
        self.calls: dict[tuple, dict[str, Any]] = {}
        self._start: float | None = None
        for module in modules:
            module.register_forward_pre_hook(self._pre, with_kwargs=True)
            module.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs):
        import torch

        self._start = self.clock.now()
        if not self.recording:
            return
        grad = torch.is_grad_enabled()
        autocast = torch.get_autocast_dtype(module.device.type) if torch.is_autocast_enabled(module.device.type) \
            else None
        tensors = [(k, tuple(v.shape), v.dtype) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        tensors += [(i, tuple(v.shape), v.dtype) for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
        state, phase = _lora_state(module), self._phase(grad)
        key = (id(module), phase, autocast, state, tuple(tensors), repr({k: v for k, v in kwargs.items()
                                                                         if not isinstance(v, torch.Tensor)}))
        if key not in self.calls:
            def copy(value):
                return value.detach().clone() if isinstance(value, torch.Tensor) else value

            self.calls[key] = dict(module=module, args=[copy(a) for a in args],
                                   kwargs={k: copy(v) for k, v in kwargs.items()}, grad=grad, autocast=autocast,
                                   lora=state, count=0, phase=phase)
        self.calls[key]["count"] += 1

    def _phase(self, grad: bool) -> str:
        if self.in_rollout:
            return "rollout_forward"
        return "train_forward" if grad else "policy_forward"

    def _post(self, module, args, output):
        import torch

        self.clock.seconds[self._phase(torch.is_grad_enabled())] += self.clock.now() - self._start

    @contextlib.contextmanager
    def rollout(self) -> Iterator[None]:
        self.in_rollout = True
        try:
            yield
        finally:
            self.in_rollout = False

    def replay(self) -> tuple[dict[str, float], dict[str, int]]:
        """Seconds to rerun every recorded call as often as it happened (after one untimed warm-up call each), by the
        phase the call was made in (training calls with their backward), and the counts of forwards and backwards."""
        import torch

        self.recording = False
        seconds, counts = defaultdict(float), {"forward": 0, "backward": 0}
        for call in self.calls.values():
            module = call["module"]
            previous = _lora_state(module)
            _set_lora_state(module, call["lora"])
            autocast = torch.autocast(module.device.type, dtype=call["autocast"]) if call["autocast"] else \
                contextlib.nullcontext()
            cotangent = None
            for repeat in range(call["count"] + 1):  # the first run warms up and is not timed
                start = self.clock.now()
                with torch.set_grad_enabled(call["grad"]), autocast:
                    out = module(*call["args"], **call["kwargs"])[0]
                if call["grad"]:
                    if cotangent is None:  # its own generator: the training run's random streams stay untouched
                        generator = torch.Generator(out.device).manual_seed(0)
                        cotangent = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
                    out.backward(cotangent)
                elapsed = self.clock.now() - start
                if repeat:
                    seconds[call["phase"]] += elapsed
                    counts["forward"] += 1
                    counts["backward"] += int(call["grad"])
            module.zero_grad(set_to_none=True)
            _set_lora_state(module, previous)
        self.calls.clear()
        return dict(seconds), counts


def _iteration_callback(clock: PhaseClock, calls: TransformerCalls, warmup: int, pure_compute: bool,
                        record: list[dict[str, Any]], marks: dict[str, float]):
    from transformers import TrainerCallback

    class IterationClock(TrainerCallback):
        """Starts each iteration's phase clock, times `optimizer.step`, and stores each iteration's split; after each
        measured iteration, replays its transformer calls (right away, so both see the same machine load)."""

        def on_step_begin(self, args, state, control, **kwargs):
            marks.setdefault("first_step", time.time())
            clock.seconds.clear()
            calls.recording = state.global_step >= warmup
            self.start = clock.now()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_start = clock.now()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.seconds["optimizer"] += clock.now() - self.optimizer_start

        def on_step_end(self, args, state, control, **kwargs):
            seconds = clock.now() - self.start
            if state.global_step > warmup:  # global_step has been incremented
                phases = {name: clock.seconds.get(name, 0.0) for name in PHASES[:-1]}
                entry = {"iteration": seconds, **phases, "rest": seconds - sum(phases.values())}
                if pure_compute:
                    entry["pure"], entry["calls"] = calls.replay()
                record.append(entry)
            calls.calls.clear()

    return IterationClock()


# ---- building ----------------------------------------------------------------------------------------------------


def build_pipeline(args: argparse.Namespace):
    import torch

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.model == "shapes":
        from flow_trl.toy import load_shapes_pipeline

        return load_shapes_pipeline(torch_dtype=dtype)
    from architectures import build_pipeline as build_architecture

    return build_architecture(args.model, torch_dtype=dtype, num_layers=args.num_layers,
                              num_single_layers=args.num_single_layers)


def _config_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE pairs; got {pair!r}.")
        overrides[key] = yaml.safe_load(value)
    return overrides


def build_trainer(args: argparse.Namespace, pipe, clock: PhaseClock, output_dir: str):
    """The trainer of `args` on `pipe`, built through the public API, with timed reward functions."""
    from peft import LoraConfig

    import flow_trl.trainer as trainers
    from flow_trl.rewards import resolve_reward_funcs
    from flow_trl.toy import shapes_dataset

    trainer_class, config_class = (getattr(trainers, name) for name in TRAINERS[args.trainer])
    images = args.prompts * args.group
    micro = args.micro_batch or images
    if images % micro:
        raise SystemExit(f"--micro_batch {micro} must divide the {images} images of a rollout.")
    config = dict(
        output_dir=output_dir,
        max_steps=args.warmup + args.iterations,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=images // micro,  # one optimizer step per rollout
        num_generations=args.group,
        num_inference_steps=args.steps,
        resolution=args.resolution,
        bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu",
        gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        num_images_to_log=0,
        seed=0,
    )
    config.update(_config_overrides(args.set))
    reward = "shapes" if args.model == "shapes" else brightness
    peft_config = None
    if args.lora_rank:
        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, init_lora_weights="gaussian",
                                 target_modules=args.lora_targets)
    return trainer_class(
        pipe,
        args=config_class(**config),
        reward_funcs=[TimedReward(f, clock) for f in resolve_reward_funcs(reward)],
        train_dataset=shapes_dataset("train"),
        peft_config=peft_config,
    )


def policy_modules(trainer) -> list:
    """Every distinct module that computes a policy (one with LoRA; the frozen copies too with full fine-tuning)."""
    modules = {}
    for name in ("default", "ref", *trainer.policies.names):
        with trainer.policy(name, trainer.transformer) as module:
            modules[id(module)] = module
    return list(modules.values())


# ---- measuring ------------------------------------------------------------------------------------------------


def peak_memory_mib(device: str) -> float:
    """Peak RSS of this process (CPU) or the CUDA caching allocator's peak allocation, in MiB."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build, train `warmup + iterations` iterations with every phase timed, replay the transformer calls; returns the
    results (`report` prints them)."""
    created = process_start_time()
    marks = {"measure_start": time.time()}
    import torch

    clock = PhaseClock(args.device)
    pipe = build_pipeline(args)
    marks["pipeline_built"] = time.time()
    record: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args, pipe, clock, output_dir)
        marks["trainer_built"] = time.time()
        # the callback needs the hooks, which need the trainer's policy modules: both are added to the built trainer
        calls = TransformerCalls(policy_modules(trainer), clock)
        trainer.add_callback(_iteration_callback(clock, calls, args.warmup, args.pure_compute, record, marks))
        sample = trainer.sample

        def sample_in_rollout(*a, **k):
            with calls.rollout():
                return sample(*a, **k)

        trainer.sample = sample_in_rollout
        trainer.adapter.encode_prompts = clock.timed("text_encode", trainer.adapter.encode_prompts)
        trainer.adapter.decode = clock.timed("decode", trainer.adapter.decode)
        trainer.accelerator.backward = clock.timed("backward", trainer.accelerator.backward)
        marks["train_called"] = time.time()
        trainer.train()
        peak = peak_memory_mib(args.device)
    n = len(record)
    pure = sum(sum(r["pure"].values()) for r in record) if args.pure_compute else None
    iteration_total = sum(r["iteration"] for r in record)
    median = statistics.median(r["iteration"] for r in record)
    phases = {name: sum(r[name] for r in record) / n for name in PHASES}
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "memory_table"},
        "machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "transformer_parameters": sum(p.numel() for p in trainer.transformer.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainer.transformer.parameters() if p.requires_grad),
        "seconds_per_iteration": {"median": median, "mean": iteration_total / len(record),
                                  "each": [r["iteration"] for r in record]},
        "phases_mean_seconds": phases,
        "pure_compute_seconds_per_iteration": pure / n if pure is not None else None,
        "pure_compute_by_phase_per_iteration": _mean_of(record, "pure") if pure else None,
        "pure_compute_calls_per_iteration": _mean_of(record, "calls") if pure else None,
        "overhead_ratio": iteration_total / pure if pure else None,
        "overhead_ratio_each": [r["iteration"] / sum(r["pure"].values()) for r in record] if pure else None,
        "startup_seconds": {
            "to_first_iteration": marks["first_step"] - created,
            "python_start": marks["measure_start"] - created,
            "pipeline": marks["pipeline_built"] - marks["measure_start"],
            "trainer": marks["trainer_built"] - marks["pipeline_built"],
            "train_setup": marks["first_step"] - marks["train_called"],
        },
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda_max_allocated" if args.device == "cuda" else "cpu_peak_rss",
    }


def _mean_of(record: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Per-iteration mean of the dicts `record[i][key]`."""
    totals: dict[str, float] = defaultdict(float)
    for entry in record:
        for name, value in entry[key].items():
            totals[name] += value / len(record)
    return dict(totals)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


def report(results: dict[str, Any]) -> str:
    """The results as a few aligned lines."""
    s = results["settings"]
    per_iter = results["seconds_per_iteration"]
    lines = [
        f"{s['trainer']} on {s['model']}: {s['prompts']} prompts x {s['group']}, {s['steps']} steps, "
        f"{s['precision']}, " + (f"LoRA r{s['lora_rank']}" if s["lora_rank"] else "full fine-tuning")
        + f", {results['machine']['device']}, {results['machine']['threads']} thread(s)",
        f"{'s/iter median':<28}{per_iter['median']:>10.3f}   (mean {per_iter['mean']:.3f} of {len(per_iter['each'])})",
    ]
    for name, seconds in results["phases_mean_seconds"].items():
        share = seconds / per_iter["mean"] if per_iter["mean"] else math.nan
        lines.append(f"  {name:<26}{seconds:>10.3f}   {share:6.1%}")
    if results["overhead_ratio"] is not None:
        lines.append(f"{'pure transformer s/iter':<28}{results['pure_compute_seconds_per_iteration']:>10.3f}")
        lines.append(f"{'iteration / pure compute':<28}{results['overhead_ratio']:>10.3f}")
    startup = results["startup_seconds"]
    lines.append(f"{'start-up s':<28}{startup['to_first_iteration']:>10.2f}   ("
                 + ", ".join(f"{k} {v:.2f}" for k, v in startup.items() if k != "to_first_iteration") + ")")
    lines.append(f"{'peak memory MiB':<28}{results['peak_memory_mib']:>10.0f}   ({results['peak_memory_kind']})")
    return "\n".join(lines)


# ---- memory model ---------------------------------------------------------------------------------------------

# the reduced-depth transformers the activation parts are measured on (real widths): every kind of block once
MEMORY_PROBES = {"sd35-medium": dict(num_layers=3, dual_attention_layers=(0,)),
                 "flux-dev": dict(num_layers=1, num_single_layers=1)}
PROBE_RESOLUTIONS = (256, 384)
TEXT_TOKENS = {"sd35-medium": 77 + 256, "flux-dev": 512}


def _block_kind(name: str, block) -> str:
    """"dual" / "joint" / "last" (SD3 joint blocks with and without a second attention, and the context-pre-only
    last one), "double" / "single" (FLUX)."""
    if name == "single_transformer_blocks":
        return "single"
    if getattr(block, "context_pre_only", False):
        return "last"
    if getattr(block, "use_dual_attention", False):
        return "dual"
    return "joint" if hasattr(block, "use_dual_attention") else "double"


def _probe_inputs(model: str, transformer, resolution: int) -> dict[str, Any]:
    """Random inputs of the real shapes for one image at `resolution` (8x VAE, then 2x2 patches / packing)."""
    import torch

    side, text_tokens = resolution // 8, TEXT_TOKENS[model]
    floats = dict(dtype=transformer.dtype, device=transformer.device)
    if model == "sd35-medium":
        return dict(hidden_states=torch.randn(1, 16, side, side, **floats),
                    encoder_hidden_states=torch.randn(1, text_tokens, 4096, **floats),
                    pooled_projections=torch.randn(1, 2048, **floats),
                    timestep=torch.tensor([500.0], device=transformer.device))
    tokens = (side // 2) ** 2
    return dict(hidden_states=torch.randn(1, tokens, 64, **floats),
                encoder_hidden_states=torch.randn(1, text_tokens, 4096, **floats),
                pooled_projections=torch.randn(1, 768, **floats),
                timestep=torch.tensor([0.5], device=transformer.device),
                img_ids=torch.zeros(tokens, 3, device=transformer.device),
                txt_ids=torch.zeros(text_tokens, 3, device=transformer.device),
                guidance=torch.tensor([3.5], device=transformer.device))


def activation_bytes(model: str, transformer, resolution: int) -> dict[str, dict[str, float]]:
    """Bytes autograd saves for the backward of one forward of one image, per block kind (`"full"`) and the bytes of
    each block's inputs (`"inputs"`, what gradient checkpointing keeps instead); `"outside"`: saved outside blocks.

    Saved tensors are counted with `torch.autograd.graph.saved_tensors_hooks`, once per storage, parameters
    excluded; the device does not matter (the same tensors are saved on CPU and GPU, with the SDPA kernels that
    keep no attention matrix)."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    seen: set[int] = set()
    current: list[str] = []
    full: dict[str, float] = defaultdict(float)
    inputs: dict[str, float] = defaultdict(float)

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            full[current[-1] if current else "outside"] += storage.nbytes()
        return tensor

    handles = []
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, group, []):
            kind = _block_kind(group, block)

            def enter(module, args, kwargs, kind=kind):
                current.append(kind)
                tensors = [*args, *kwargs.values()]
                inputs[kind] = sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 1)

            def leave(*_) -> None:
                current.pop()

            handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            transformer(**_probe_inputs(model, transformer, resolution), return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return {"full": dict(full), "inputs": dict(inputs)}


def _real_text_encoder_parameters(model: str) -> int:
    """Parameters of the real text encoders (CLIP-L, OpenCLIP bigG and T5-XXL's encoder; FLUX: CLIP-L and T5-XXL),
    counted from their published configs on the meta device."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    clip_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        if model == "sd35-medium":
            encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**clip_l)),
                        CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)), T5EncoderModel(t5)]
        else:
            encoders = [CLIPTextModel(CLIPTextConfig(**clip_l)), T5EncoderModel(t5)]
    return sum(p.numel() for encoder in encoders for p in encoder.parameters())


def memory_table(device: str, lora_rank: int, lora_targets: list[str]) -> dict[str, Any]:
    """The measured parts of each architecture and the expected GPU memory (bf16, AdamW, gradient checkpointing,
    one image per micro-batch) per model x resolution x LoRA/full x trainer; see `format_memory_table`."""
    import torch
    from architectures import VAE_16CH, build_transformer, count_parameters, default_dtype, transformer_config
    from peft import LoraConfig

    GiB = 2**30
    out: dict[str, Any] = {"parts": {}, "rows": []}
    for model, probe in MEMORY_PROBES.items():
        config = transformer_config(model)
        if model == "sd35-medium":
            dual = len(config["dual_attention_layers"])
            blocks = {"dual": dual, "joint": config["num_layers"] - dual - 1, "last": 1}
        else:
            blocks = {"double": config["num_layers"], "single": config["num_single_layers"]}
        with torch.device("meta"):
            meta = build_transformer(model)
        suffixes = tuple(f".{t}" for t in lora_targets)
        lora_params = sum(lora_rank * (m.in_features + m.out_features) for n, m in meta.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.endswith(suffixes))
        parts: dict[str, Any] = {
            "transformer_parameters": count_parameters(model),
            "transformer_buffers": count_parameters(model, buffers=True),
            "lora_parameters": lora_params,
            "text_encoder_parameters": _real_text_encoder_parameters(model),
            "vae_parameters": sum(p.numel() for p in _meta_vae(VAE_16CH).parameters()),
            "blocks": blocks,
        }
        for mode in ("lora", "full"):
            torch.manual_seed(0)
            with default_dtype(torch.bfloat16), torch.device(device):
                transformer = build_transformer(model, **probe)
            if mode == "lora":
                transformer.requires_grad_(False)
                transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=lora_targets))
                parts["lora_dtype_bytes"] = next(p for n, p in transformer.named_parameters()
                                                 if "lora_" in n).element_size()
            measured = {res: activation_bytes(model, transformer, res) for res in PROBE_RESOLUTIONS}
            parts[f"activations_{mode}"] = {str(res): m for res, m in measured.items()}
            del transformer
        out["parts"][model] = parts
        for resolution in MEMORY_RESOLUTIONS:
            for mode in ("lora", "full"):
                act = _extrapolate(parts[f"activations_{mode}"], model, resolution)
                checkpointed = sum(n * act["inputs"][k] for k, n in blocks.items()) + max(act["full"][k] for k in
                                                                                           blocks)
                plain = sum(n * act["full"][k] for k, n in blocks.items())
                outside = act["full"].get("outside", 0.0)
                weights = 2 * (parts["transformer_parameters"] + parts["transformer_buffers"])
                for trainer, lora_copies, full_copies in (("nft", 1, 2), ("grpo", 0, 1)):
                    if mode == "lora":
                        trainable = parts["lora_parameters"] * parts["lora_dtype_bytes"]
                        policies = trainable * lora_copies
                    else:
                        trainable = 2 * parts["transformer_parameters"]
                        policies = weights * full_copies
                    state = trainable * (1 if mode == "lora" else 0) + 3 * trainable  # weights, grads, 2 AdamW
                    frozen = 2 * (parts["text_encoder_parameters"] + parts["vae_parameters"])
                    core = weights + policies + state + checkpointed + outside
                    out["rows"].append({
                        "model": model, "resolution": resolution, "mode": mode, "trainer": trainer,
                        "weights_gib": weights / GiB, "policies_and_optimizer_gib": (policies + state) / GiB,
                        "activations_per_image_gib": (checkpointed + outside) / GiB,
                        "activations_per_image_no_checkpointing_gib": (plain + outside) / GiB,
                        "text_encoders_and_vae_gib": frozen / GiB,
                        "total_gib": (core + frozen) / GiB, "total_encoders_freed_gib": core / GiB,
                    })
    return out


def _meta_vae(config: dict[str, Any]):
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**config)


def _extrapolate(measured: dict[str, dict[str, dict[str, float]]], model: str, resolution: int):
    """Each measured byte count, linear in the number of image tokens through the two probe resolutions (text tokens
    are fixed), at `resolution`."""
    (r0, a), (r1, b) = sorted(measured.items(), key=lambda item: int(item[0]))
    t0, t1, t = ((int(r) // 16) ** 2 for r in (r0, r1, resolution))
    return {part: {k: a[part][k] + (b[part][k] - a[part][k]) * (t - t0) / (t1 - t0) for k in a[part]}
            for part in ("full", "inputs")}


def format_memory_table(table: dict[str, Any]) -> str:
    """The rows as a markdown table, after the formula."""
    lines = [
        "Expected GPU memory (GiB), bf16 weights, AdamW, gradient checkpointing, 1 image per micro-batch:",
        "total = weights (params + buffers, 2 B) + policies (NFT: an old LoRA, or old + ref full copies; GRPO: none,",
        "or a ref copy) + trainable x (grads + 2 AdamW states [+ the LoRA itself]) + activations (block inputs x",
        "blocks + one block recomputed + outside blocks; measured, linear in image tokens) + text encoders and VAE.",
        "",
        "| model | px | train | trainer | weights | policies+optimizer | act/image | act/image no ckpt | "
        "encoders+VAE | total | total, encoders freed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        lines.append(
            f"| {row['model']} | {row['resolution']} | {row['mode']} | {row['trainer']} | {row['weights_gib']:.1f} | "
            f"{row['policies_and_optimizer_gib']:.1f} | {row['activations_per_image_gib']:.2f} | "
            f"{row['activations_per_image_no_checkpointing_gib']:.1f} | {row['text_encoders_and_vae_gib']:.1f} | "
            f"{row['total_gib']:.1f} | {row['total_encoders_freed_gib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))  # architectures.py, when imported rather than run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_table:
        table = memory_table(args.device, args.lora_rank or 32, args.lora_targets)
        print(format_memory_table(table))
        path = Path(args.output_json or "memory-table.json")
        path.write_text(json.dumps(table, indent=2))
        print(f"written to {path}")
        return
    results = measure(args)
    print(report(results))
    path = Path(args.output_json or f"throughput-{args.trainer}-{args.model}.json")
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
