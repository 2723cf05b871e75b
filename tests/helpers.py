"""Small shared pieces of the test suite (importable because pytest puts `tests/` on `sys.path`): the tiny run
settings, LoRA and prompts every trainer test builds on, and test rewards."""

from typing import Any

from peft import LoraConfig

from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset


MODEL = str(SHAPES_PIPELINE_DIR)

# A run of seconds on the shapes world: one step of 4 images (2 prompts x 2 samples), 4 sampling steps, no saving.
TINY_RUN: dict[str, Any] = dict(
    per_device_train_batch_size=4,
    num_generations=2,
    num_inference_steps=4,
    max_steps=1,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def tiny_config(config_class: type, output_dir, /, **overrides: Any):
    """A `config_class` (any flow_trl trainer config) with `TINY_RUN`'s settings; `overrides` replace any of them."""
    return config_class(**{"output_dir": str(output_dir), **TINY_RUN, **overrides})


def tiny_lora(**overrides: Any) -> LoraConfig:
    """A rank-4 LoRA with Gaussian init, so the adapter changes the model from the first step."""
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian", **overrides})


def train_prompts(n: int = 8):
    """The first `n` shapes-world training prompts."""
    return shapes_dataset("train").select(range(n))


def redness(prompts, images, **kwargs):
    """Mean red minus mean green/blue: a continuous reward, so the samples of a group practically never tie.

    The shapes reward has a few discrete levels; with groups of 2 both samples can score the same, and then every
    advantage is zero and no weight moves. Tests about gradient flow use this reward so they do not depend on that.
    """
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
