"""Test-wide settings: never touch the network, keep CPU threads bounded, share the expensive fixtures."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shapes_pipe():
    """The shipped pretrained shapes pipeline (loaded once per session; do not mutate it in tests)."""
    from flow_trl.toy import load_shapes_pipeline

    return load_shapes_pipeline()
