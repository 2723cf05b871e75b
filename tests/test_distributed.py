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


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_process")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "scripts" / "two_process_nft.py"), str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
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
