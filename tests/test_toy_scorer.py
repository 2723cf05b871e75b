"""The GenEval-style shapes scorer: detection, partial credit, strict accuracy, quality, reward API and metric."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from flow_trl.toy import ShapesReward, aggregate, detect_objects, quality, score_batch, score_image
from flow_trl.toy.evaluation import evaluation_rows
from flow_trl.toy.world import BACKGROUND, render, render_batch, render_layout


def draw(*objects):
    """Render explicit objects ``(shape, color, cx, cy)`` (radius 8) as a ``[3, 64, 64]`` tensor."""
    layout = [{"shape": s, "color": c, "cx": x, "cy": y, "r": 8.0} for s, c, x, y in objects]
    return torch.from_numpy(render_layout(layout)).permute(2, 0, 1).contiguous()


def sanity_figures(num_per_family: int = 48, seed: int = 10_000) -> dict[str, float]:
    """Scorer sanity on held-out prompts: ground truth, blurred ground truth, noise, and another prompt's render."""
    rows = evaluation_rows(num_per_family, seed)
    truth = render_batch(rows, [r["seed"] for r in rows])
    blurred = torch.from_numpy(ndimage.gaussian_filter(truth.numpy(), sigma=(0, 0, 0.8, 0.8)))
    noise = torch.rand(truth.shape, generator=torch.Generator().manual_seed(seed))
    shifted = [rows[(i + math.ceil(len(rows) / 2)) % len(rows)] for i in range(len(rows))]
    other = render_batch(shifted, [r["seed"] for r in rows])
    figures = {}
    for name, images in (("truth", truth), ("blurred", blurred), ("noise", noise), ("other_prompt", other)):
        summary = aggregate(score_batch(images, rows))
        figures.update({f"{name}/{k}": v for k, v in summary.items() if "/" not in k})
    return figures


def test_detects_every_shape_and_colour_with_its_position():
    image = draw(("circle", "red", 14, 14), ("square", "green", 48, 16), ("triangle", "blue", 30, 48))
    found = {(o["shape"], o["color"]): (o["cx"], o["cy"]) for o in detect_objects(image)}
    assert set(found) == {("circle", "red"), ("square", "green"), ("triangle", "blue")}
    assert np.allclose(found[("circle", "red")], (14, 14), atol=0.6)
    assert np.allclose(found[("square", "green")], (48, 16), atol=0.6)
    assert abs(found[("triangle", "blue")][0] - 30) < 0.6
    assert found[("triangle", "blue")][1] > 48  # a triangle's mass sits below its box centre


def test_blank_image_and_tiny_dots_have_no_objects():
    blank = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, 64, 64).clone()
    assert detect_objects(blank) == []
    dotted = blank.clone()
    dotted[:, 10:12, 10:12] = torch.tensor([0.88, 0.14, 0.14]).view(3, 1, 1)  # 4 red pixels
    assert detect_objects(dotted) == []


@pytest.mark.parametrize(
    "prompt, image, score, strict",
    [
        ("a photo of a red circle", draw(("circle", "red", 32, 32)), 1.0, 1.0),
        # right colour, wrong shape: neither the shape count nor the shape+colour count is met
        ("a photo of a red circle", draw(("square", "red", 32, 32)), 0.0, 0.0),
        # right shape, wrong colour: the count credit only
        ("a photo of a red circle", draw(("circle", "blue", 32, 32)), 0.5, 0.0),
        # wrong count: 2 of 3 found -> 1 - 1/3
        ("a photo of three squares", draw(("square", "red", 14, 14), ("square", "blue", 48, 48)), 2 / 3, 0.0),
        # too many also costs: 4 of 2 -> 1 - 2/2
        (
            "a photo of two circles",
            draw(("circle", "red", 14, 14), ("circle", "red", 48, 14), ("circle", "red", 14, 48),
                 ("circle", "red", 48, 48)),
            0.0,
            0.0,
        ),
        # wrong side: both objects right, relation wrong
        ("a photo of a circle left of a square", draw(("square", "red", 14, 32), ("circle", "red", 48, 32)), 2 / 3,
         0.0),
        ("a photo of a circle left of a square", draw(("circle", "red", 14, 32), ("square", "red", 48, 32)), 1.0, 1.0),
        ("a photo of a triangle above a circle", draw(("triangle", "green", 32, 12), ("circle", "red", 32, 48)), 1.0,
         1.0),
        ("a photo of a triangle below a circle", draw(("triangle", "green", 32, 12), ("circle", "red", 32, 48)),
         2 / 3, 0.0),
        # colour attribution swapped: both shapes present, neither colour right
        ("a photo of a red circle and a blue square", draw(("circle", "blue", 14, 32), ("square", "red", 48, 32)),
         0.5, 0.0),
        ("a photo of a red circle and a blue square", draw(("circle", "red", 14, 32), ("square", "blue", 48, 32)),
         1.0, 1.0),
        # a missing second object
        ("a photo of a triangle and a square", draw(("triangle", "purple", 32, 32)), 0.5, 0.0),
        # objects the prompt does not mention are not penalised (as in GenEval)
        ("a photo of a square", draw(("square", "yellow", 14, 14), ("circle", "red", 48, 48)), 1.0, 1.0),
    ],
)
def test_partial_credit_on_constructed_cases(prompt, image, score, strict):
    result = score_image(image, prompt)
    assert result["score"] == pytest.approx(score)
    assert result["strict"] == strict


def test_ground_truth_scores_perfectly_even_blurred_and_noise_scores_nothing():
    figures = sanity_figures(num_per_family=12)
    assert figures["truth/strict"] >= 0.98
    assert figures["blurred/strict"] >= 0.98
    assert figures["noise/score"] <= 0.1
    assert figures["other_prompt/score"] < figures["truth/score"] - 0.4
    assert figures["truth/quality"] > 0.95 and figures["noise/quality"] < 0.05


def test_blur_beyond_the_generator_range_degrades_gracefully():
    rows = evaluation_rows(4, seed=7)
    truth = render_batch(rows, [r["seed"] for r in rows])
    heavy = torch.from_numpy(ndimage.gaussian_filter(truth.numpy(), sigma=(0, 0, 3.0, 3.0)))
    assert aggregate(score_batch(heavy, rows))["score"] < aggregate(score_batch(truth, rows))["score"]


def test_quality_falls_with_speckle_and_off_palette_colour():
    clean = render("a photo of a red circle and a blue square", seed=0)
    speckled = clean.clone()
    rng = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 64, generator=rng) < 0.05
    speckled[:, mask] = torch.tensor([0.14, 0.69, 0.22]).view(3, 1)  # isolated green dots
    grey = clean * 0.5 + 0.25  # washed-out colours are far from the palette
    q = {name: quality(img)["quality"] for name, img in (("clean", clean), ("speckled", speckled), ("grey", grey))}
    assert q["clean"] > 0.95
    assert q["speckled"] < q["clean"] - 0.02
    assert quality(speckled)["speckle_fraction"] > 0.3
    assert q["grey"] < 0.5


def test_reward_uses_columns_when_given_and_prompt_text_otherwise():
    image = draw(("circle", "red", 32, 32))[None]
    reward = ShapesReward()
    assert reward(["a photo of a red circle"], image) == [1.0]
    # the metadata columns win over the prompt text
    columns = {"objects": [[{"shape": "square", "color": None, "count": 1}]], "relation": [None], "tag": ["x"]}
    assert reward(["a photo of a red circle"], image, **columns) == [0.0]
    # unrelated keyword arguments (other columns, trainer state) are ignored
    assert reward(["a photo of a circle"], image, trainer_state=object(), seed=[3]) == [1.0]
    assert ShapesReward(strict=True)(["a photo of a blue circle"], image) == [0.0]
    assert reward(["a photo of a blue circle"], image) == [0.5]
    assert reward.name == "shapes" and ShapesReward(strict=True).name == "shapes_strict"


def test_reward_and_batch_scorer_agree():
    rows = evaluation_rows(3, seed=1)
    images = render_batch(rows, [r["seed"] + 100 for r in rows])
    images[::2] = images[::2].flip(-1)  # mirrored images break left/right relations
    prompts = [r["prompt"] for r in rows]
    assert ShapesReward()(prompts, images) == pytest.approx(score_batch(images, rows)["score"])


@pytest.mark.parametrize(
    "images, prompts, message",
    [
        (torch.rand(2, 64, 64), ["a circle"] * 2, "shape"),
        (torch.rand(2, 1, 64, 64), ["a circle"] * 2, "shape"),
        (torch.rand(2, 3, 64, 64) * 2 - 1, ["a circle"] * 2, r"\[0, 1\]"),
        (torch.full((1, 3, 64, 64), float("nan")), ["a circle"], "NaN"),
        (torch.rand(2, 3, 64, 64), ["a circle"] * 3, "3 prompts but 2 images"),
        (torch.rand(1, 3, 64, 64), "a circle", "list of strings"),
        (torch.rand(1, 3, 64, 64), ["a dog on a skateboard"], "not a shapes-world prompt"),
    ],
)
def test_reward_rejects_bad_input_clearly(images, prompts, message):
    with pytest.raises(ValueError, match=message):
        ShapesReward()(prompts, images)


def test_reward_rejects_column_length_mismatch_and_bad_metadata():
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="Column 'objects' has 1 entries for 2 prompts"):
        ShapesReward()(["a circle"] * 2, images, objects=[[{"shape": "circle", "color": None, "count": 1}]])
    with pytest.raises(ValueError, match="Bad object clause"):
        ShapesReward()(["a circle"], images[:1], objects=[[{"shape": "dog", "color": None, "count": 1}]])
    with pytest.raises(ValueError, match="2 images but 3"):
        score_batch(images, ["a circle"] * 3)


def test_evaluate_metric_matches_aggregate():
    import datasets  # noqa: F401  (evaluate needs datasets imported first to load a local module)
    import evaluate

    from flow_trl.toy.shapes_metric import METRIC_PATH

    rows = evaluation_rows(2, seed=5)
    images = render_batch(rows, [r["seed"] for r in rows])
    images[1::2] = images[1::2].flip(-2)  # upside down: above/below relations fail
    prompts = [r["prompt"] for r in rows]
    metric = evaluate.load(METRIC_PATH)
    metric.add_batch(predictions=images[:6], references=prompts[:6])
    metric.add_batch(predictions=images[6:], references=prompts[6:])
    result = metric.compute()
    expected = aggregate(score_batch(images, prompts))
    assert result.keys() == expected.keys()
    assert result == pytest.approx(expected)
