"""Two CPU processes under `accelerate launch`: whole groups, advantages as in one process, one gathered evaluation."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flow_trl.advantages import clip_advantages, group_advantages


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(out: Path, *engine: str, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of tests/scripts/two_process_nft.py on 2 processes with the `engine` flags."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "scripts" / "two_process_nft.py"), str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_process")
    result = launch_two_processes(out, "--multi_gpu")
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]


def test_both_processes_train_one_synchronised_model(records):
    assert [r["num_processes"] for r in records] == [2, 2]
    assert records[0]["lora_sum"] == pytest.approx(records[1]["lora_sum"], rel=1e-6)
    assert records[0]["lora_abs_sum"] == pytest.approx(records[1]["lora_abs_sum"], rel=1e-6)


def test_groups_stay_whole_and_advantages_match_one_process(records):
    rollouts = [r["rollouts"] for r in records]
    calls = [r["train_calls"] for r in records]
    assert len(rollouts[0]) == len(rollouts[1]) == 2  # 4 steps, 2 micro-batches per rollout
    for i in range(2):
        prompts = calls[0][i]["prompts"] + calls[1][i]["prompts"]  # process order = gather order
        assert len(prompts) == 12 and len(calls[0][i]["prompts"]) == 6
        groups = [prompts[g : g + 4] for g in range(0, 12, 4)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3
        # a group is split across the processes (images 4-7): only the gather makes it whole
        assert calls[0][i]["prompts"][4] == calls[1][i]["prompts"][0]
        rewards = torch.tensor(calls[0][i]["rewards"] + calls[1][i]["rewards"])
        for k in range(2):
            assert rollouts[k][i]["gathered_rewards"] == pytest.approx(rewards.tolist())
            # each process trains on its own samples' rewards ...
            assert rollouts[k][i]["rewards"] == pytest.approx(calls[k][i]["rewards"])
        # ... with the advantages a single process computes on the whole rollout
        scale, clip = records[0]["scale_rewards"], records[0]["advantage_clip"]
        expected = clip_advantages(group_advantages(rewards, 4, scale), clip)
        local = torch.tensor(rollouts[0][i]["advantages"] + rollouts[1][i]["advantages"])
        torch.testing.assert_close(local, expected, atol=1e-6, rtol=0)


def test_evaluation_scores_each_prompt_once_and_gathers_the_mean(records):
    scored = [p for r in records for call in r["eval_calls"] for p in call["prompts"]]
    rewards = [v for r in records for call in r["eval_calls"] for v in call["rewards"]]
    assert len(scored) == 6  # split between the processes, each row once
    assert {len(sum((c["prompts"] for c in r["eval_calls"]), [])) for r in records} == {3}
    assert records[0]["eval_reward"] == records[1]["eval_reward"] == pytest.approx(sum(rewards) / 6)


def test_fsdp_on_cpu_processes_is_refused_instead_of_training_unsharded(tmp_path):
    """accelerate shards with FSDP only on accelerators: on CPU processes its state falls back to DDP (gloo) without a
    word, so a CPU FSDP run cannot exist (examples/accelerate_configs/fsdp.yaml is checked on GPUs by
    benchmarks/check_gpu_engines.py). The launch fails on both processes, before any model is loaded."""
    result = launch_two_processes(
        tmp_path, "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "JointTransformerBlock", CUDA_VISIBLE_DEVICES="",
    )
    assert result.returncode != 0
    message = "accelerate was launched with FSDP (ACCELERATE_USE_FSDP=true), but this run has no accelerator"
    assert result.stderr.count(message) >= 2, result.stderr[-4000:]
    assert "accelerate launch --multi_gpu --num_processes N" in result.stderr
    assert not list(tmp_path.glob("rank*.json"))


def test_loss_chunks_reach_the_accumulation_boundary_once(tmp_path, monkeypatch):
    """Under DeepSpeed, whose `backward` steps the optimizer at an accumulation boundary, a micro-batch of 3 loss
    chunks backpropagates the first two off the boundary and only the last on it, without DeepSpeed's own
    accumulation scaling (the loss is already divided, as transformers' Trainer does)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from helpers import MODEL, redness, tiny_config, tiny_lora, train_prompts

    from flow_trl import DanceGRPOConfig, DanceGRPOTrainer

    trainer = DanceGRPOTrainer(MODEL, args=tiny_config(DanceGRPOConfig, tmp_path, timestep_fraction=0.99),
                               reward_funcs=redness, train_dataset=train_prompts(4), peft_config=tiny_lora())
    calls = []

    def backward(loss, **kwargs):
        calls.append((trainer.accelerator.gradient_state.sync_gradients, kwargs))
        loss.backward()

    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by train() otherwise
    monkeypatch.setattr(trainer.accelerator, "backward", backward)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    trainer.training_step(trainer.model, batch)
    assert [sync for sync, _ in calls] == [False, False, True]  # 3 of the 4 steps' transitions are recorded
    assert all(kwargs == {"scale_wrt_gas": False} for _, kwargs in calls)
    assert trainer.accelerator.gradient_state.sync_gradients  # restored for the optimizer step


def test_a_command_destroys_its_process_group_before_exit(tmp_path, monkeypatch):
    """`flow-trl <command>` ends the process group `accelerate launch` started (left to the interpreter's exit, gloo
    can abort a finished run); without one, ending it is a no-op."""
    import torch.distributed as dist

    from flow_trl.scripts import utils

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    monkeypatch.setattr(utils.TrainerScript, "main", lambda self, script_args, training_args: {"ran": True})
    from flow_trl.scripts.nft import SCRIPT

    try:
        assert SCRIPT.cli(["--output_dir", str(tmp_path / "out")]) == {"ran": True}
        assert not dist.is_initialized()
        utils.end_distributed()  # no process group: nothing to do
    finally:  # never leave a process group to the tests that follow
        if dist.is_initialized():
            dist.destroy_process_group()
