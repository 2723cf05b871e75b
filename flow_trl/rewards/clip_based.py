"""Rewards on CLIP embeddings: PickScore, CLIPScore and the LAION aesthetic predictor.

All three load a `transformers.CLIPModel` and its processor with ``from_pretrained`` and feed it PIL images
quantised to uint8, as flow_grpo does (see docs/rewards.md for each published configuration).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import RewardModel, to_pil


PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_SCALE = 26.0  # flow_grpo divides the PickScore logit by 26 so that rewards land near [0, 1]
CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


class CLIPRewardModel(RewardModel):
    """Loads a `CLIPModel` and its processor; embeds prompts and images (L2-normalised, fp32).

    Args:
        model: model id or local path of the CLIP weights.
        processor: id or path of the processor (tokenizer + image preprocessing); defaults to ``model``.
        device, dtype, batch_size: see `RewardModel`.
    """

    def __init__(self, model: str, processor: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model_name_or_path = model
        self.processor_name_or_path = processor or model

    def _load(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.processor_name_or_path)
        self.model = self._build_model().to(self.device, self.dtype).eval().requires_grad_(False)

    def _build_model(self) -> nn.Module:
        """The `CLIPModel` with its weights (on CPU or ``self.device``; `_load` moves and freezes it)."""
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.model_name_or_path, dtype=self.dtype)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` in [0, 1] -> unit-norm projected image embeddings ``[b, D]`` (fp32)."""
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return nn.functional.normalize(features.float(), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unit-norm projected text embeddings ``[b, D]`` (fp32), truncated to the tokenizer's length."""
        tokens = self.processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(**tokens).pooler_output
        return nn.functional.normalize(features.float(), dim=-1)

    def scaled_cosine(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """CLIP's logit per (prompt, image) pair: ``logit_scale.exp() * cos(text, image)``, shape ``[b]``."""
        cosine = (self.embed_texts(prompts) * self.embed_images(images)).sum(dim=-1)
        return self.model.logit_scale.exp().float() * cosine


class PickScore(CLIPRewardModel):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(text, image)``, divided by 26 by default.

    The raw score (``normalize=False``) is the one of the PickScore paper and the Pick-a-Pic leaderboard (about
    18-23 for SD-class images); ``normalize=True`` divides by 26 as flow_grpo's ``pickscore_scorer`` does, which is
    what Flow-GRPO and DiffusionNFT report as "PickScore reward".

    Args:
        normalize: divide by 26 (flow_grpo's reward scale).
        model, processor: weights and processor (CLIP-H's, as in the PickScore repository).
        device, dtype, batch_size: see `RewardModel`.
    """

    name = "pickscore"

    def __init__(
        self, normalize: bool = True, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, **kwargs
    ):
        super().__init__(model=model, processor=processor, **kwargs)
        self.normalize = normalize

    def _score(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        score = self.scaled_cosine(prompts, images)
        return score / PICKSCORE_SCALE if self.normalize else score


class CLIPScore(CLIPRewardModel):
    """CLIP text-image similarity with ``openai/clip-vit-large-patch14``: ``logits_per_image / 100``.

    This is DiffusionNFT's CLIPScore reward; with the OpenAI weights (``logit_scale.exp() == 100``) it equals the
    cosine similarity, in [-1, 1] (about 0.2-0.35 for matching pairs).

    Args:
        model: CLIP weights (and processor).
        device, dtype, batch_size: see `RewardModel`.
    """

    name = "clipscore"

    def __init__(self, model: str = CLIP_L14, **kwargs):
        super().__init__(model=model, **kwargs)

    def _score(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        return self.scaled_cosine(prompts, images) / 100.0


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor's head (layer names match its published state dict)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticScore(CLIPRewardModel):
    """The LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``): an MLP on unit-norm CLIP-L/14 image
    embeddings, predicting a 1-10 rating (about 4.5-6.5 for typical generations). The prompt is ignored.

    Args:
        head: path or URL of the MLP's state dict (loaded with ``weights_only=True``).
        model: CLIP weights (and processor) whose image embeddings the head was trained on.
        device, dtype, batch_size: see `RewardModel`.
    """

    name = "aesthetic"

    def __init__(self, head: str = AESTHETIC_HEAD_URL, model: str = CLIP_L14, **kwargs):
        super().__init__(model=model, **kwargs)
        self.head_path = head

    def _load(self) -> None:
        super()._load()
        if Path(self.head_path).exists():
            state = torch.load(self.head_path, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(self.head_path, map_location="cpu", weights_only=True)
        self.head = AestheticMLP(self.model.config.projection_dim)
        self.head.load_state_dict(state)
        self.head.to(self.device, self.dtype).eval().requires_grad_(False)

    def _score(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed_images(images).to(self.dtype)).squeeze(-1)
