"""The shapes world's prompts, metadata, splits and rendering."""

import numpy as np
import pytest
import torch

from flow_trl.toy.world import (
    BACKGROUND,
    COLORS,
    PALETTE,
    SHAPES,
    TAGS,
    all_prompts,
    metadata_to_body,
    parse_prompt,
    render,
    render_batch,
    render_layout,
    sample_layout,
    shapes_dataset,
    split_prompts,
)


def test_render_is_deterministic_in_the_seed():
    a = render("a photo of a red circle and a blue square", seed=3)
    b = render("a photo of a red circle and a blue square", seed=3)
    c = render("a photo of a red circle and a blue square", seed=4)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_every_prompt_parses_back_to_its_metadata():
    rows = all_prompts()
    assert len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        meta = {k: row[k] for k in ("tag", "objects", "relation")}
        assert parse_prompt(row["prompt"]) == meta
        assert row["prompt"].endswith(metadata_to_body(meta))


def test_metadata_matches_the_family():
    for row in all_prompts():
        objects, tag = row["objects"], row["tag"]
        assert tag in TAGS
        assert all(o["shape"] in SHAPES and (o["color"] is None or o["color"] in COLORS) for o in objects)
        assert (row["relation"] is not None) == (tag == "position")
        assert (len(objects) == 2) == (tag in ("two_object", "position", "color_attr"))
        assert all(o["color"] for o in objects) == (tag in ("colors", "color_attr"))
        assert any(o["count"] > 1 for o in objects) == (tag == "counting")


def test_splits_are_disjoint_cover_everything_and_keep_every_family():
    train, test = split_prompts("train"), split_prompts("test")
    train_p, test_p = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert not train_p & test_p
    assert train_p | test_p == {r["prompt"] for r in all_prompts()}
    for tag in TAGS:
        assert any(r["tag"] == tag for r in train) and any(r["tag"] == tag for r in test)
    assert 0.2 < len(test) / (len(train) + len(test)) < 0.3


def test_shapes_dataset_columns_and_unknown_split():
    ds = shapes_dataset("test")
    assert set(ds.column_names) == {"prompt", "tag", "objects", "relation"}
    assert ds[0]["prompt"] == split_prompts("test")[0]["prompt"]
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        shapes_dataset("validation")


def test_balanced_dataset_trains_every_family_equally_often():
    train = split_prompts("train")
    counts = {tag: sum(r["tag"] == tag for r in train) for tag in TAGS}
    assert counts["color_attr"] == max(counts.values()) > 10 * counts["single_object"]  # why balancing matters
    balanced = shapes_dataset("train", balanced=True)
    assert len(balanced) == len(TAGS) * counts["color_attr"]
    for tag in TAGS:
        prompts = [row["prompt"] for row in balanced if row["tag"] == tag]
        family = [r["prompt"] for r in train if r["tag"] == tag]
        assert len(prompts) == counts["color_attr"]
        assert set(prompts) == set(family)  # every prompt kept, each within one repeat of the others
        assert max(prompts.count(p) for p in family) - min(prompts.count(p) for p in family) <= 1


def test_parse_prompt_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        parse_prompt("an astronaut riding a horse")


@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_layout_honours_the_relation(relation):
    meta = {"tag": "position", "objects": [{"shape": "circle", "color": None, "count": 1},
                                           {"shape": "square", "color": None, "count": 1}], "relation": relation}
    for seed in range(20):
        a, b = sample_layout(meta, seed)
        dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
        expected = {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx)}
        assert expected[relation]
        assert (a["shape"], b["shape"]) == ("circle", "square")


def test_layout_counts_colours_and_separation():
    meta = parse_prompt("a photo of four triangles")
    for seed in range(20):
        layout = sample_layout(meta, seed)
        assert [o["shape"] for o in layout] == ["triangle"] * 4
        for i, p in enumerate(layout):
            for q in layout[i + 1:]:
                assert np.hypot(p["cx"] - q["cx"], p["cy"] - q["cy"]) > p["r"] + q["r"]
    layout = sample_layout(parse_prompt("a photo of a purple square and a yellow circle"), seed=0)
    assert [(o["shape"], o["color"]) for o in layout] == [("square", "purple"), ("circle", "yellow")]


def test_rendering_paints_only_the_requested_colours_on_the_background():
    image = render_layout([{"shape": "square", "color": "green", "cx": 32, "cy": 32, "r": 8}])
    pixels = image.reshape(-1, 3)
    is_bg = np.all(np.isclose(pixels, BACKGROUND, atol=1e-6), axis=1)
    is_green = np.all(np.isclose(pixels, PALETTE["green"], atol=1e-6), axis=1)
    # a square of half-side 0.88 * 8 px covers ~14x14 pixels fully; everything else is background or anti-aliasing
    assert 12 * 12 <= is_green.sum() <= 15 * 15
    assert is_bg.sum() + is_green.sum() + 4 * 16 >= 64 * 64
    assert image[32, 32].tolist() == pytest.approx(PALETTE["green"])
    assert image[2, 2].tolist() == pytest.approx(BACKGROUND)


def test_render_batch_checks_lengths():
    assert render_batch(["a photo of a circle"] * 2, [0, 1]).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        render_batch(["a photo of a circle"] * 2, [0])
