"""HPSv2 / HPSv2.1 (Wu et al. 2023) scored with transformers' CLIPModel, without open_clip.

The HPSv2 checkpoints (``xswu/HPSv2``: ``HPS_v2.1_compressed.pt``, ``HPS_v2_compressed.pt``) are open_clip ViT-H-14
state dicts. :func:`convert_open_clip_state_dict` renames them for `transformers.CLIPModel` with the architecture of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model HPSv2 fine-tunes), whose processor applies open_clip's
validation transform (bicubic resize of the shortest side to 224, centre crop, OpenAI mean/std) and tokenizer (the
CLIP BPE, 77 tokens). The score is the HPSv2 package's: the cosine of the normalised image and text features, with
no logit scale (about 0.2-0.35).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .clip_based import CLIPRewardModel


if TYPE_CHECKING:
    from transformers import CLIPModel


HPS_REPO = "xswu/HPSv2"
HPS_V21_FILE = "HPS_v2.1_compressed.pt"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# open_clip name -> transformers CLIPModel name, for the tensors outside the residual blocks
_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# inside a residual block (open_clip's ``resblocks.i.`` -> transformers' ``layers.i.``)
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT CLIP state dict for `transformers.CLIPModel`.

    Fused attention input projections (``in_proj_weight``/``in_proj_bias``, rows q, k, v) are split into
    ``q_proj``/``k_proj``/``v_proj``; the text and image projections (applied as ``x @ proj`` in open_clip) are
    transposed into linear weights. Unknown keys are kept as they are, so that a strict load reports them.
    """
    out = {}
    for key, value in state.items():
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.T.contiguous()
        elif ".resblocks." in key:
            tower, rest = key.split(".resblocks.")
            index, name = rest.split(".", 1)
            prefix = f"{'vision_model' if tower == 'visual.transformer' else 'text_model'}.encoder.layers.{index}."
            if name.startswith("attn.in_proj_"):
                kind = name.rsplit("_", 1)[1]  # weight or bias
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part.contiguous()
            else:
                module, kind = name.rsplit(".", 1)
                out[f"{prefix}{_BLOCK_RENAMES.get(module, module)}.{kind}"] = value
        else:
            out[key] = value
    return out


class HPSv2(CLIPRewardModel):
    """Human Preference Score v2.1 (default) or v2: the cosine of CLIP-H features fine-tuned on HPD v2.

    Args:
        checkpoint: local path of an HPSv2 ``.pt`` checkpoint, or a file name in the ``xswu/HPSv2`` Hub repository
            (``"HPS_v2.1_compressed.pt"``, ``"HPS_v2_compressed.pt"``). Loaded with ``weights_only=True``.
        model: CLIP architecture (config) and processor the checkpoint fits.
        device, dtype, batch_size: see `RewardModel`.
    """

    name = "hpsv2"

    def __init__(self, checkpoint: str = HPS_V21_FILE, model: str = CLIP_H14, **kwargs):
        super().__init__(model=model, **kwargs)
        self.checkpoint = checkpoint

    def _build_model(self) -> CLIPModel:
        from huggingface_hub import hf_hub_download
        from transformers import CLIPConfig, CLIPModel

        path = self.checkpoint if Path(self.checkpoint).exists() else hf_hub_download(HPS_REPO, self.checkpoint)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = CLIPModel(CLIPConfig.from_pretrained(self.model_name_or_path))
        model.load_state_dict(convert_open_clip_state_dict(state.get("state_dict", state)))
        return model

    def _score(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        return (self.embed_texts(prompts) * self.embed_images(images)).sum(dim=-1)
