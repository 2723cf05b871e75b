"""Built-in reward models on tiny offline-built models of the real classes, loaded through the real code paths."""

import importlib.util
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


# ---------------------------------------------------------------------------------------------- tiny models

TINY_TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    hidden_act="gelu",
)
TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    hidden_act="gelu",
)


def _text_config(tokenizer) -> dict:
    from flow_trl.toy.pipeline import BOS_ID, EOS_ID, PAD_ID

    return dict(TINY_TEXT, vocab_size=len(tokenizer), bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIPModel + CLIPProcessor (offline word-level tokenizer) saved to disk, logit scale exp() = 50."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flow_trl.toy.pipeline import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = CLIPModel(CLIPConfig(text_config=_text_config(tokenizer), vision_config=TINY_VISION, projection_dim=8))
    model.logit_scale.data.fill_(math.log(50.0))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory):
    """An Owlv2ForObjectDetection + Owlv2Processor saved to disk (16 candidate boxes per image)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from flow_trl.toy.pipeline import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = Owlv2Config(text_config=_text_config(tokenizer), vision_config=TINY_VISION, projection_dim=16)
    path = tmp_path_factory.mktemp("owlv2")
    Owlv2ForObjectDetection(config).save_pretrained(path)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


PROMPTS = [
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a green triangle",
    "a photo of a yellow square",
]


@pytest.fixture(scope="module")
def images():
    return torch.rand(len(PROMPTS), 3, 40, 48, generator=torch.Generator().manual_seed(0))


def _pil(images: torch.Tensor) -> list[Image.Image]:
    """The uint8-rounded PIL images every reference computation starts from."""
    return [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]


def _reference_clip_logits(path: str, prompts: list[str], images: torch.Tensor):
    """CLIP's own forward (logits_per_image diagonal) and image embeddings, on uint8-rounded PIL images."""
    from transformers import AutoProcessor, CLIPModel

    processor, model = AutoProcessor.from_pretrained(path), CLIPModel.from_pretrained(path)
    pil = _pil(images)
    inputs = processor(text=prompts, images=pil, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal(), out.image_embeds


# ---------------------------------------------------------------------------------------------- CLIP family


def test_pickscore_is_scaled_cosine_over_26_and_raw_without_normalisation(tiny_clip, images):
    from flow_trl.rewards import PickScore

    logits, _ = _reference_clip_logits(tiny_clip, PROMPTS, images)
    normalised = PickScore(model=tiny_clip, processor=tiny_clip, device="cpu")(PROMPTS, images)
    raw = PickScore(normalize=False, model=tiny_clip, processor=tiny_clip, device="cpu")(PROMPTS, images)
    assert normalised.shape == (4,) and normalised.dtype == torch.float32
    torch.testing.assert_close(raw, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalised, logits / 26, atol=1e-6, rtol=1e-5)
    assert raw.abs().max() <= 50 + 1e-4  # |logit_scale * cosine| <= logit_scale


def test_clipscore_is_logits_per_image_over_100(tiny_clip, images):
    from flow_trl.rewards import CLIPScore

    logits, _ = _reference_clip_logits(tiny_clip, PROMPTS, images)
    torch.testing.assert_close(CLIPScore(model=tiny_clip, device="cpu")(PROMPTS, images), logits / 100)


def test_aesthetic_is_the_laion_mlp_on_unit_norm_image_embeddings(tiny_clip, images, tmp_path):
    from flow_trl.rewards import AestheticScore
    from flow_trl.rewards.clip_based import AestheticMLP

    torch.manual_seed(1)
    head = AestheticMLP(input_size=8)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    assert set(head.state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    _, embeds = _reference_clip_logits(tiny_clip, PROMPTS, images)
    expected = embeds  # the MLP has no activations: a chain of affine maps (dropout is off in eval)
    for i in (0, 2, 4, 6, 7):
        layer = head.layers[i]
        expected = expected @ layer.weight.T + layer.bias
    scores = AestheticScore(head=str(tmp_path / "head.pth"), model=tiny_clip, device="cpu")(["ignored"] * 4, images)
    torch.testing.assert_close(scores, expected.squeeze(-1).detach(), atol=1e-5, rtol=1e-4)


def test_chunked_scoring_equals_one_call_and_nothing_needs_gradient(tiny_clip, images):
    from flow_trl.rewards import PickScore

    whole = PickScore(model=tiny_clip, processor=tiny_clip, device="cpu", batch_size=8)
    chunked = PickScore(model=tiny_clip, processor=tiny_clip, device="cpu", batch_size=3)
    images = images.clone().requires_grad_(True)
    scores = whole(PROMPTS, images)
    torch.testing.assert_close(chunked(PROMPTS, images), scores, atol=1e-6, rtol=1e-6)
    assert not scores.requires_grad
    assert not any(p.requires_grad for p in whole.model.parameters())


def test_loading_is_lazy_and_dtype_is_applied(tiny_clip, images):
    from flow_trl.rewards import CLIPScore

    missing = CLIPScore(model="/nonexistent/clip")  # constructing never touches the weights
    with pytest.raises(OSError):
        missing(PROMPTS, images)
    reward = CLIPScore(model=tiny_clip, device="cpu", dtype=torch.bfloat16)
    assert not hasattr(reward, "model")
    scores = reward(PROMPTS, images)
    assert reward.model.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, CLIPScore(model=tiny_clip, device="cpu")(PROMPTS, images), atol=0.02, rtol=0)


def _random_open_clip_state_dict(
    vocab: int, width: int = 16, embed: int = 8, layers: int = 2, context: int = 16, patch: int = 8, grid: int = 4
) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict (open_clip's names and shapes) with random values."""
    shapes = {
        "token_embedding.weight": (vocab, width),
        "positional_embedding": (context, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, embed),
        "logit_scale": (),
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid * grid + 1, width),
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,),
        "visual.ln_post.bias": (width,),
        "visual.proj": (width, embed),
    }
    block = {
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "mlp.c_fc.weight": (2 * width, width),
        "mlp.c_fc.bias": (2 * width,),
        "mlp.c_proj.weight": (width, 2 * width),
        "mlp.c_proj.bias": (width,),
    }
    for tower in ("transformer", "visual.transformer"):
        shapes.update({f"{tower}.resblocks.{i}.{k}": v for i in range(layers) for k, v in block.items()})
    g = torch.Generator().manual_seed(3)
    return {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}


def _open_clip_tower(x: torch.Tensor, state: dict, prefix: str, layers: int, causal: bool) -> torch.Tensor:
    """open_clip's residual attention blocks (pre-LayerNorm, nn.MultiheadAttention, GELU MLP), written out."""
    width, length = x.shape[-1], x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1) if causal else None
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, 2, batch_first=True)
        names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
        attn.load_state_dict({name: state[p + "attn." + name] for name in names})
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return x


def _open_clip_features(state: dict, input_ids: torch.Tensor, eos_id: int, pixels: torch.Tensor):
    """open_clip's encode_text / encode_image (normalised), from its state dict. The text is pooled at the end token
    (open_clip takes the argmax id, which is the end token in the real vocabulary)."""
    x = state["token_embedding.weight"][input_ids] + state["positional_embedding"][: input_ids.shape[1]]
    x = _open_clip_tower(x, state, "transformer", 2, causal=True)
    x = F.layer_norm(x, (16,), state["ln_final.weight"], state["ln_final.bias"])
    text = x[torch.arange(len(x)), (input_ids == eos_id).int().argmax(dim=1)] @ state["text_projection"]
    patches = F.conv2d(pixels, state["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(len(pixels), 1, -1)
    x = torch.cat([cls, patches], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (16,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = _open_clip_tower(x, state, "visual.transformer", 2, causal=False)
    image = (
        F.layer_norm(x[:, 0], (16,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
        @ state["visual.proj"]
    )
    return F.normalize(text, dim=-1), F.normalize(image, dim=-1)


def test_hpsv2_converts_open_clip_weights_and_scores_the_cosine(tiny_clip, images, tmp_path):
    from transformers import AutoProcessor

    from flow_trl.rewards import HPSv2
    from flow_trl.toy.pipeline import EOS_ID

    processor = AutoProcessor.from_pretrained(tiny_clip)
    state = _random_open_clip_state_dict(vocab=len(processor.tokenizer))
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    reward = HPSv2(checkpoint=str(tmp_path / "hps.pt"), model=tiny_clip, device="cpu", batch_size=3)
    scores = reward(PROMPTS, images)  # the strict load inside checks that every converted name exists
    pil = _pil(images)
    inputs = processor(text=PROMPTS, images=pil, padding=True, return_tensors="pt")
    text, image = _open_clip_features(state, inputs["input_ids"], EOS_ID, inputs["pixel_values"])
    torch.testing.assert_close(scores, (text * image).sum(-1), atol=1e-5, rtol=1e-4)
    assert scores.abs().max() <= 1 + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clip_rewards_on_cuda_match_cpu(tiny_clip, images):
    from flow_trl.rewards import CLIPScore, PickScore

    for reward_cls, kwargs in ((PickScore, {"processor": tiny_clip}), (CLIPScore, {})):
        cpu = reward_cls(model=tiny_clip, device="cpu", **kwargs)(PROMPTS, images)
        cuda = reward_cls(model=tiny_clip, device="cuda", **kwargs)(PROMPTS, images.cuda())
        assert cuda.device.type == "cpu"
        torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- JPEG


def _jpeg_kb(image: torch.Tensor) -> float:
    buffer = io.BytesIO()
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_are_signed_file_sizes():
    from flow_trl.rewards import JPEGCompressibility, JPEGIncompressibility

    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    incompressible = JPEGIncompressibility()(["a", "b"], images)
    assert incompressible.tolist() == pytest.approx([_jpeg_kb(flat[0]), _jpeg_kb(noise[0])])
    assert incompressible[1] > 3 * incompressible[0]  # noise does not compress
    torch.testing.assert_close(JPEGCompressibility()(["a", "b"], images), -incompressible)
    torch.testing.assert_close(JPEGCompressibility(scale=500)(["a", "b"], images), -incompressible / 500)
    torch.testing.assert_close(JPEGIncompressibility(batch_size=1)(["a", "b"], images), incompressible)


# ---------------------------------------------------------------------------------------------- OCR


def test_quoted_text_and_edit_distance_by_hand():
    from flow_trl.rewards.ocr import levenshtein, quoted_text, text_reward

    assert quoted_text('A sign that says "Hello World" on a wall') == "helloworld"
    assert quoted_text('"first" and "second"') == "first"
    assert quoted_text("no quotes here") is None and quoted_text('just one " quote') is None
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert text_reward("hello", "Well, HEL LO there") == 1.0  # substring after normalisation
    assert text_reward("hello", "hallo") == pytest.approx(0.8)
    assert text_reward("hello", "help") == pytest.approx(1 - 2 / 5)
    assert text_reward("hello", "") == 0.0
    assert text_reward("hi", "a much longer unrelated text") == 0.0  # distance capped at len(target)


def test_ocr_reward_with_an_injected_backend_abstains_without_quotes():
    from flow_trl.rewards import OCRReward

    seen = []

    def backend(image: np.ndarray) -> str:
        seen.append((image.dtype, image.shape))
        return "HELLO" if image.mean() > 127 else "hallo"

    images = torch.stack([torch.ones(3, 8, 12), torch.zeros(3, 8, 12), torch.ones(3, 8, 12)])
    prompts = ['a sign saying "hello"', 'a sign saying "hello"', "a sign"]
    rewards = OCRReward(backend=backend, batch_size=2)(prompts, images)
    assert rewards[:2].tolist() == pytest.approx([1.0, 0.8]) and math.isnan(rewards[2])
    assert seen[0] == (np.uint8, (8, 12, 3))


def test_ocr_default_backend_needs_the_extra():
    """EasyOCR downloads its weights on first use: offline, only the missing-extra error can be tested."""
    from flow_trl.rewards import OCRReward

    if importlib.util.find_spec("easyocr") is not None:
        pytest.skip("EasyOCR is installed; building its reader would download weights.")
    with pytest.raises(ImportError, match=r"flow-trl\[ocr\]"):
        OCRReward(device="cpu")(['"a"'], torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- detector


def test_relative_position_follows_geneval():
    from flow_trl.rewards.detection import relative_position

    left, right = np.array([0.0, 0.4, 0.2, 0.6]), np.array([0.6, 0.4, 0.8, 0.6])
    assert relative_position(left, right) == {"left of"} and relative_position(right, left) == {"right of"}
    top, bottom = np.array([0.4, 0.0, 0.6, 0.2]), np.array([0.4, 0.7, 0.6, 0.9])
    assert relative_position(top, bottom) == {"above"} and relative_position(bottom, top) == {"below"}
    # centres 0.05 apart, sizes 0.2 + 0.2: the 0.1 * 0.4 = 0.04 margin leaves 0.01 / 0.05 = 0.2 < 0.5 -> nothing
    assert relative_position(np.array([0.0, 0.0, 0.2, 0.2]), np.array([0.05, 0.0, 0.25, 0.2])) == set()
    # diagonal at 45 degrees: each normalised component is ~0.7 after the margin -> two relations
    assert relative_position(np.array([0, 0, 0.1, 0.1]), np.array([0.8, 0.8, 0.9, 0.9])) == {"left of", "above"}


def test_geneval_credits_by_hand():
    from flow_trl.rewards.detection import geneval_score

    box_a, box_b = np.array([[0.0, 0.4, 0.2, 0.6]]), np.array([[0.6, 0.4, 0.8, 0.6]])
    meta = {"objects": [{"shape": "dog", "color": None, "count": 2}]}
    assert geneval_score({"a photo of a dog": np.concatenate([box_a, box_b])}, meta) == {"score": 1.0, "strict": 1.0}
    assert geneval_score({"a photo of a dog": box_a}, meta) == {"score": 0.5, "strict": 0.0}
    assert geneval_score({}, meta)["score"] == 0.0
    meta = {
        "objects": [{"shape": "cat", "color": "red", "count": 1}, {"shape": "dog", "color": None, "count": 1}],
        "relation": "left of",
    }
    found = {"a photo of a cat": box_a, "a photo of a red cat": box_a, "a photo of a dog": box_b}
    assert geneval_score(found, meta) == {"score": 1.0, "strict": 1.0}
    found = {"a photo of a cat": box_b, "a photo of a dog": box_a}  # colour missed, relation reversed
    assert geneval_score(found, meta) == {"score": pytest.approx(2 / 4), "strict": 0.0}
    with pytest.raises(ValueError, match="exactly two object clauses"):
        geneval_score(found, {"objects": meta["objects"][:1], "relation": "left of"})


@pytest.mark.parametrize(
    ("prompt", "tag", "objects", "relation"),
    [
        ("a photo of a bench", "single_object", [("bench", None, 1)], None),
        ("a photo of an orange", "single_object", [("orange", None, 1)], None),  # the fruit, not a colour
        ("a photo of a toilet and a computer mouse", "two_object", [("toilet", None, 1), ("computer mouse", None, 1)],
         None),
        ("a photo of two sheep", "counting", [("sheep", None, 2)], None),
        ("a photo of four knives", "counting", [("knife", None, 4)], None),
        ("a photo of three computer mice", "counting", [("computer mouse", None, 3)], None),
        ("a photo of two people", "counting", [("person", None, 2)], None),
        ("a photo of three buses", "counting", [("bus", None, 3)], None),
        ("a photo of four wine glasses", "counting", [("wine glass", None, 4)], None),
        ("a photo of two horses", "counting", [("horse", None, 2)], None),
        ("a photo of an orange cat", "colors", [("cat", "orange", 1)], None),
        ("a photo of a pink car", "colors", [("car", "pink", 1)], None),
        ("a photo of a dog right of a teddy bear", "position", [("dog", None, 1), ("teddy bear", None, 1)],
         "right of"),
        ("A photo of a hot dog  below a dining table", "position", [("hot dog", None, 1), ("dining table", None, 1)],
         "below"),
        ("a photo of a red umbrella and a blue cow", "color_attr", [("umbrella", "red", 1), ("cow", "blue", 1)],
         None),
        ("a photo of a brown giraffe and a white stop sign", "color_attr",
         [("giraffe", "brown", 1), ("stop sign", "white", 1)], None),
    ],
)
def test_geneval_prompts_parse_with_real_object_names(prompt, tag, objects, relation):
    from flow_trl.rewards.geneval import parse_geneval_prompt

    clauses = [{"shape": s, "color": c, "count": n} for s, c, n in objects]
    assert parse_geneval_prompt(prompt) == {"tag": tag, "objects": clauses, "relation": relation}


def test_every_coco_class_round_trips_through_the_geneval_grammar():
    from flow_trl.rewards.geneval import COCO_CLASSES, make_clause, noun_phrase, parse_geneval_prompt

    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80
    for noun in COCO_CLASSES:
        for count in (1, 3):
            item = make_clause(noun, None, count)
            parsed = parse_geneval_prompt(f"a photo of {noun_phrase(item)}", nouns=COCO_CLASSES)
            assert parsed["objects"] == [item], noun_phrase(item)
    assert noun_phrase(make_clause("knife", "red", 2)) == "two red knives"


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("an astronaut riding a horse", "does not start with 'a photo of'"),
        ("a photo of a cat on the mat", "'a cat on the mat' does not name an object"),
        ("a photo of five cats", "'five cats' does not start with 'a', 'an' or a count"),
        ("a photo of cats", "'cats' does not start with 'a', 'an' or a count"),
        ("a photo of a cat and a dog and a cow", "at most two clauses"),
        ("a photo of a", "'a' does not name an object"),
    ],
)
def test_a_prompt_outside_the_geneval_grammar_fails_clearly(prompt, match):
    from flow_trl.rewards.geneval import parse_geneval_prompt

    with pytest.raises(ValueError, match=f"is not a GenEval-style prompt .*{match}.*Pass the dataset's 'objects'"):
        parse_geneval_prompt(prompt)


def test_a_vocabulary_restricts_the_object_names():
    from flow_trl.rewards.geneval import COCO_CLASSES, parse_geneval_prompt

    assert parse_geneval_prompt("a photo of a unicorn")["objects"][0]["shape"] == "unicorn"
    with pytest.raises(ValueError, match="unknown object 'unicorn'"):
        parse_geneval_prompt("a photo of a unicorn", nouns=COCO_CLASSES)


def test_detector_reward_parses_real_geneval_prompts(monkeypatch):
    from flow_trl.rewards import DetectorReward

    reward = DetectorReward(model="/nonexistent", device="cpu")
    seen = []

    def detect(images, texts):  # two boxes per query: the clause counts decide the credit
        seen.extend(texts)
        box = np.array([[0.0, 0.4, 0.2, 0.6], [0.6, 0.4, 0.8, 0.6]])
        return [{text: box for text in image_texts} for image_texts in texts]

    monkeypatch.setattr(reward, "detect", detect)
    prompts = ["a photo of two sheep", "a photo of four knives", "a photo of a red umbrella and a blue cow"]
    scores = reward._score(prompts, torch.zeros(3, 3, 8, 8))
    assert seen == [
        ["a photo of a sheep"],
        ["a photo of a knife"],
        ["a photo of an umbrella", "a photo of a red umbrella", "a photo of a cow", "a photo of a blue cow"],
    ]
    assert scores == [1.0, 0.5, 0.0]


def test_nms_keeps_the_best_of_overlapping_boxes():
    from flow_trl.rewards.detection import nms

    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0.9], [2, 2, 3, 3]], dtype=torch.float32)
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.3]), iou=0.5).tolist() == [1, 2]
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.3]), iou=1.0).tolist() == [1, 0, 2]


def _owlv2_probabilities(path: str, query: str, images: torch.Tensor) -> torch.Tensor:
    """OWLv2's own forward: the sigmoid score of every candidate box for one query, ``[B, boxes]``."""
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    processor, model = AutoProcessor.from_pretrained(path), Owlv2ForObjectDetection.from_pretrained(path)
    pil = _pil(images)
    inputs = processor(
        text=[[query]] * len(pil), images=pil, padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**inputs).logits[..., 0].sigmoid()


def test_detector_reward_counts_thresholded_boxes_of_the_real_owlv2(tiny_owlv2, images):
    from flow_trl.rewards import DetectorReward

    # threshold 0 and no suppression: every one of the 16 candidate boxes counts, for every query
    objects = [
        [{"shape": "circle", "color": None, "count": 16}],
        [{"shape": "circle", "color": None, "count": 8}],
        [{"shape": "square", "color": "red", "count": 16}],
        [{"shape": "circle", "color": None, "count": 1}],
    ]
    every_box = DetectorReward(model=tiny_owlv2, threshold=0.0, nms_iou=1.0, device="cpu")
    assert every_box(PROMPTS, images, objects=objects).tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0])
    # threshold 0.9: the count is the number of boxes whose score reaches it in OWLv2's own forward
    found = (_owlv2_probabilities(tiny_owlv2, "a photo of a circle", images) >= 0.9).sum(dim=1).tolist()
    assert min(found) >= 1
    reward = DetectorReward(model=tiny_owlv2, threshold=0.9, nms_iou=1.0, device="cpu")
    exact = [[{"shape": "circle", "color": None, "count": n}] for n in found]
    one_more = [[{"shape": "circle", "color": None, "count": n + 1}] for n in found]
    assert reward(PROMPTS, images, objects=exact).tolist() == [1.0] * 4
    assert reward(PROMPTS, images, objects=one_more).tolist() == pytest.approx([1 - 1 / (n + 1) for n in found])
    default = DetectorReward(model=tiny_owlv2, device="cpu", batch_size=4)
    scores = default(PROMPTS, images)  # no metadata columns: prompts are parsed as shapes-world prompts
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(DetectorReward(model=tiny_owlv2, device="cpu", batch_size=1)(PROMPTS, images), scores)


# ---------------------------------------------------------------------------------------------- names, bad input


def test_every_builtin_name_resolves_without_loading_weights():
    from flow_trl.rewards import BUILTIN_REWARDS, RemoteReward, RewardModel, resolve_reward_funcs

    names = [
        "pickscore",
        "hpsv2",
        "clipscore",
        "aesthetic",
        "ocr",
        "geneval_owlv2",
        "jpeg_compressibility",
        "jpeg_incompressibility",
    ]
    assert set(names) <= set(BUILTIN_REWARDS)
    rewards = resolve_reward_funcs([*names, "http://127.0.0.1:1/score"])
    assert all(isinstance(r, RewardModel) and not r._loaded for r in rewards)
    assert [r.name for r in rewards] == [*names, "remote"] and isinstance(rewards[-1], RemoteReward)


def test_cli_accepts_builtin_reward_names_and_weights(tmp_path):
    from flow_trl.scripts.grpo import make_parser

    flags = "--reward_funcs pickscore jpeg_compressibility --reward_weights 1 0.5 --output_dir".split()
    script_args, args = make_parser().parse_args_and_config([*flags, str(tmp_path)])[:2]
    assert script_args.reward_funcs == ["pickscore", "jpeg_compressibility"] and args.reward_weights == [1.0, 0.5]


def test_unknown_name_lists_the_known_ones():
    from flow_trl.rewards import resolve_reward_funcs

    with pytest.raises(ValueError, match="Unknown reward 'hpsv3'.*clipscore.*jpeg_compressibility.*pickscore"):
        resolve_reward_funcs(["hpsv3"])


@pytest.mark.parametrize(
    ("prompts", "images", "match"),
    [
        (["a"], torch.full((1, 3, 8, 8), 1.5), r"in \[0, 1\]; got values in \[1.500, 1.500\]"),
        (["a"], torch.full((1, 3, 8, 8), -1.0), r"map them with \(x \+ 1\) / 2"),
        (["a"], torch.rand(1, 8, 8), r"shape \[B, 3, H, W\]"),
        (["a"], torch.rand(1, 4, 8, 8), r"got shape \(1, 4, 8, 8\)"),
        (["a", "b"], torch.rand(1, 3, 8, 8), "Got 2 prompts but 1 images"),
        ("a", torch.rand(1, 3, 8, 8), "list of strings"),
        (["a"], torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    ],
)
def test_bad_input_fails_clearly_before_any_loading(prompts, images, match):
    from flow_trl.rewards import PickScore

    reward = PickScore(model="/nonexistent")
    with pytest.raises(ValueError, match=match):
        reward(prompts, images)
    assert not reward._loaded


def test_column_length_mismatch_fails_clearly():
    from flow_trl.rewards import DetectorReward

    with pytest.raises(ValueError, match="Column 'objects' has 1 entries for 2 prompts"):
        DetectorReward(model="/nonexistent")(["a", "b"], torch.rand(2, 3, 8, 8), objects=[[]])


def test_dotted_path_to_a_reward_class_gives_an_instance():
    from flow_trl.rewards import JPEGCompressibility, resolve_reward_funcs

    (reward,) = resolve_reward_funcs(["flow_trl.rewards.JPEGCompressibility"])
    assert isinstance(reward, JPEGCompressibility)
