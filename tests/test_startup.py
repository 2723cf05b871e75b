"""Start-up cost: what building a trainer and training must not import."""

import subprocess
import sys

import pytest


# A LoRA NFT run on the shapes world (dropout kept, the "shapes" reward), one tiny step, in a fresh interpreter; it
# prints the modules it never needed that were imported anyway.
_RUN = """
import sys
from peft import LoraConfig
from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

args = FlowNFTConfig(output_dir=sys.argv[1], per_device_train_batch_size=4, num_generations=2, num_inference_steps=2,
                     max_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
trainer = FlowNFTTrainer(str(SHAPES_PIPELINE_DIR), args=args, reward_funcs="shapes",
                         train_dataset=shapes_dataset("train").select(range(4)), peft_config=LoraConfig(r=4))
trainer.train()
unneeded = ("trl", "rich", "evaluate", "matplotlib", "torchvision", "flow_trl.toy.shapes_metric", "flow_trl.drm",
            *(f"flow_trl.rewards.{family}" for family in ("clip_based", "compression", "detection", "hpsv2", "ocr",
                                                          "remote")))
print(sorted(name for name in unneeded if name in sys.modules))
"""


def test_a_lora_nft_run_imports_no_unneeded_module(tmp_path):
    result = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_reward_model_classes_are_imported_on_first_use():
    code = (
        "import sys\n"
        "import flow_trl.rewards as rewards\n"
        "before = 'flow_trl.rewards.compression' in sys.modules\n"
        "from flow_trl.rewards import JPEGCompressibility\n"
        "from flow_trl.rewards.compression import JPEGCompressibility as direct\n"
        "print(before, JPEGCompressibility is direct, 'PickScore' in dir(rewards), "
        "'flow_trl.rewards.clip_based' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False True True False"


def test_lazy_reward_names_resolve_like_their_modules():
    from flow_trl import rewards
    from flow_trl.rewards.remote import RemoteReward

    assert rewards.RemoteReward is RemoteReward
    (remote,) = rewards.resolve_reward_funcs("http://localhost:1/score")
    assert isinstance(remote, RemoteReward)
    (jpeg,) = rewards.resolve_reward_funcs("flow_trl.rewards.JPEGCompressibility")  # a dotted path to a lazy name
    assert type(jpeg).__name__ == "JPEGCompressibility"
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchReward'"):
        rewards.NoSuchReward  # noqa: B018

