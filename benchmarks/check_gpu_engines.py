"""The check the first multi-GPU run makes of the accelerate configs in examples/accelerate_configs/.

    pip install deepspeed  # once, for deepspeed_zero2.yaml
    python benchmarks/check_gpu_engines.py --num_processes 2 --out engine_check

For each of NFT and DanceGRPO, launches a 2-step LoRA run on the shapes world (fp32, so that the engines can be
compared to 1e-4) once in a single process and once per config (`multi_gpu.yaml` = DDP, `fsdp.yaml` = FSDP2,
`deepspeed_zero2.yaml` = ZeRO-2) on `--num_processes` GPUs. Every process writes its losses, the sum and absolute
sum of its full LoRA weights, the LoRA file that `save_model` wrote, and its peak CUDA memory to `<out>/<run>/`.
The check then prints one JSON line per run and fails (exit 1) unless:

- every multi-process run finished, and its processes hold the same weights (synchronised training);
- FSDP and ZeRO-2 give DDP's losses and weights (rel. 1e-4): the same rollouts (one generator per process index)
  and the same mean gradient, so any difference is the engine's (e.g. an optimizer step per backward call, or a
  loss scaled twice by gradient accumulation);
- the saved LoRA equals the trained weights (FSDP and ZeRO-2 must gather them before `save_model` writes them);
- the single-process run trains (finite losses, weights moved).

A run of 2 processes does not reproduce the single-process one (each process samples its own noise): that is
tests/test_distributed.py's business, on CPU. On CPU processes accelerate cannot shard (FSDP and DeepSpeed fall
back to DDP, which flow_trl refuses with a message), so this check needs GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "multi_gpu": ROOT / "examples" / "accelerate_configs" / "multi_gpu.yaml",
    "fsdp": ROOT / "examples" / "accelerate_configs" / "fsdp.yaml",
    "deepspeed_zero2": ROOT / "examples" / "accelerate_configs" / "deepspeed_zero2.yaml",
}
ALGORITHMS = ("nft", "grpo")
TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(algorithm: str, out: Path) -> None:
    """One process of a run: train 2 steps, save, and record what the check compares."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    from flow_trl import DanceGRPOConfig, DanceGRPOTrainer, FlowNFTConfig, FlowNFTTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

    classes = {"nft": (FlowNFTConfig, FlowNFTTrainer), "grpo": (DanceGRPOConfig, DanceGRPOTrainer)}
    config_class, trainer_class = classes[algorithm]
    args = config_class(
        output_dir=str(out / "model"), per_device_train_batch_size=4, num_generations=4, steps_per_generation=2,
        gradient_accumulation_steps=2, num_inference_steps=4, max_steps=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
    )
    trainer = trainer_class(str(SHAPES_PIPELINE_DIR), args=args, reward_funcs="shapes",
                            train_dataset=shapes_dataset("train").select(range(32)),
                            peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"))
    initial = lora_weights(trainer.transformer)
    trainer.train()
    trained = lora_weights(trainer.transformer)
    trainer.save_model()
    record = {
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "lora_sum": sum(t.double().sum().item() for t in trained.values()),
        "lora_abs_sum": sum(t.double().abs().sum().item() for t in trained.values()),
        "lora_moved": any(not torch.equal(trained[n], initial[n]) for n in trained),
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    if trainer.accelerator.is_main_process:
        saved = load_file(str(out / "model" / "pytorch_lora_weights.safetensors"))
        record["saved_lora_abs_sum"] = sum(t.double().abs().sum().item() for t in saved.values())
    (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(record))


def lora_weights(module) -> dict:
    """The full (gathered, for FSDP2's sharded DTensors) weights of the trained LoRA adapter ("default"; NFT's "old"
    adapter is not saved) of `module`, on the CPU."""
    weights = {}
    for name, param in module.named_parameters():
        if "lora_" in name and ".default." in name:
            value = param.detach()
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            weights[name] = value.float().cpu().clone()
    return weights


def launch(engine: str, algorithm: str, num_processes: int, out: Path) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--worker", algorithm, "--out", str(out)]
    if engine == "single":
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[engine]),
               "--num_processes", str(num_processes), "--mixed_precision", "no",
               "--main_process_port", str(free_port()), *script]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def check(algorithm: str, engines: list[str], num_processes: int, out: Path) -> list[str]:
    """Launch every run of `algorithm`; returns the failures."""
    failures, records = [], {}
    for engine in ["single", *engines]:
        folder = out / f"{algorithm}_{engine}"
        result = launch(engine, algorithm, num_processes, folder)
        ranks = sorted(folder.glob("rank*.json"))
        if result.returncode != 0 or not ranks:
            failures.append(f"{algorithm}/{engine}: exit {result.returncode}\n{result.stderr[-3000:]}")
            continue
        records[engine] = [json.loads(path.read_text()) for path in ranks]
        print(json.dumps({"algorithm": algorithm, "engine": engine, "ranks": records[engine]}))
    for engine, ranks in records.items():
        first = ranks[0]
        if not all(math.isfinite(loss) for loss in first["losses"]) or not first["lora_moved"]:
            failures.append(f"{algorithm}/{engine}: did not train (losses {first['losses']})")
        if engine != "single" and (len(ranks) != num_processes or first["num_processes"] != num_processes):
            failures.append(f"{algorithm}/{engine}: {len(ranks)} processes recorded, {num_processes} launched")
        if any(not close(r["lora_abs_sum"], first["lora_abs_sum"]) for r in ranks):
            failures.append(f"{algorithm}/{engine}: processes hold different weights")
        if not close(first.get("saved_lora_abs_sum", float("nan")), first["lora_abs_sum"]):
            failures.append(f"{algorithm}/{engine}: the saved LoRA differs from the trained one")
    reference = records.get("multi_gpu")
    for engine in ("fsdp", "deepspeed_zero2"):
        if reference is None or engine not in records:
            continue
        ours, ddp = records[engine][0], reference[0]
        same_losses = len(ours["losses"]) == len(ddp["losses"]) and all(
            close(a, b) for a, b in zip(ours["losses"], ddp["losses"])
        )
        if not same_losses or not close(ours["lora_sum"], ddp["lora_sum"]):
            failures.append(f"{algorithm}/{engine}: differs from DDP (losses {ours['losses']} vs {ddp['losses']}, "
                            f"LoRA sum {ours['lora_sum']} vs {ddp['lora_sum']})")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2, help="GPUs per multi-process run.")
    parser.add_argument("--engines", nargs="*", default=list(CONFIGS), choices=list(CONFIGS),
                        help="Configs of examples/accelerate_configs to check (none: the single-process runs only).")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--out", type=Path, default=Path("engine_check"), help="Folder for the runs' records.")
    parser.add_argument("--worker", choices=ALGORITHMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    failures = [f for algorithm in args.algorithms for f in check(algorithm, args.engines, args.num_processes,
                                                                   args.out)]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
