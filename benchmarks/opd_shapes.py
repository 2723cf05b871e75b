"""Flow-OPD on the shapes world: teachers, the distilled student (with and without MAR) and an NFT baseline.

    python benchmarks/opd_shapes.py --output_dir runs/opd-bench [--teacher_steps 100] [--student_steps 30]
    python benchmarks/opd_shapes.py --output_dir runs/opd-bench --teacher_dir runs/opd-s42/teachers \
        --no_mar_student false

1. Two teachers with `flow-trl nft`'s recipe (every linear weight, exported as an exact rank-128 LoRA), each on its
   own families (`SHAPES_TEACHER_FAMILIES` and `train_shapes_teacher` of flow_trl/scripts/opd.py): "objects"
   (single_object, two_object, counting) and "attributes" (colors, position, color_attr); `--teacher_dir` reuses
   teachers trained by `flow-trl opd` (its `<output_dir>/teachers`).
2. The student, `flow-trl opd`'s shapes recipe (a LoRA of the teachers' shape, started as their model soup, kl_only)
   on every family, routed by family to its teacher, with MAR (mar_coef 0.04, the base model as anchor) and, unless
   `--no_mar_student false`, without (mar_coef 0); plus the soup itself (the student before any step).
3. `--baselines nft`: `flow-trl nft`'s recipe on every family with the student's budget (same optimizer steps and
   images per step); the shapes reward already scores every family, so it is the multi-task reward.

A model whose folder already holds its LoRA is evaluated, not trained again. Every model is evaluated on the same
held-out rows (`--eval_per_family` per family, fixed seeds, 10 Euler steps): per-family mean score and its standard
error, paired differences student - teacher (same prompts and seeds) with their standard error, and the quality
metric. Writes `results.json`, `table.md` and `grid.png` to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any


def parse_recipe(module, overrides: dict[str, Any], recipe: dict[str, Any] | None = None):
    """(script_args, training_args) of a `flow-trl` command's shapes recipe (or `recipe`) with `overrides`."""
    recipe = module.SCRIPT.shapes_defaults if recipe is None else recipe
    return module.make_parser().parse_args_and_config([], defaults={**recipe, **overrides})


def train_student(
    kind: str, output_dir: Path, steps: int | None, teachers: dict[str, str], mar_coef: float, batch_size: int
) -> float:
    """Train one student (`kind` opd) or baseline (nft) on every shapes family, `steps` optimizer steps (None: the
    student recipe's); returns minutes."""
    from flow_trl.scripts import nft, opd
    from flow_trl.scripts.utils import build_peft_config
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset
    from flow_trl.trainer import FlowNFTTrainer, FlowOPDTrainer

    module, trainer_class = {"opd": (opd, FlowOPDTrainer), "nft": (nft, FlowNFTTrainer)}[kind]
    overrides = {
        "output_dir": str(output_dir),
        "max_steps": steps or opd.SHAPES_OPD_DEFAULTS["max_steps"],
        "logging_steps": 5,
        "per_device_train_batch_size": batch_size,
    }
    if kind == "opd":
        overrides.update(teachers=teachers, mar_coef=mar_coef)
    script_args, args = parse_recipe(module, overrides)
    if kind == "opd":
        opd.match_teacher_lora(script_args, next(iter(teachers.values())))
    start = time.time()
    trainer = trainer_class(
        model=str(SHAPES_PIPELINE_DIR),
        args=args,
        reward_funcs=script_args.reward_funcs,
        train_dataset=shapes_dataset("train", balanced=script_args.balance_families),
        peft_config=build_peft_config(script_args),
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return (time.time() - start) / 60


def save_soup(teacher_folders: list[str], output_dir: Path) -> None:
    """The student's cold start (`cold_start="merge_deltas"`) saved as a LoRA: the teachers' model soup."""
    from flow_trl.lora import average_lora_deltas, lora_shape, read_lora

    rank, alpha, _ = lora_shape(*read_lora(teacher_folders[0]))
    average_lora_deltas(teacher_folders, rank, alpha, output_dir=output_dir)


def evaluate(lora: str | None, rows: list[dict]) -> tuple[dict[str, list], Any]:
    """Per-sample held-out results (score, strict, quality, tag) of the base pipeline + `lora`, and the images."""
    from flow_trl.toy import load_shapes_pipeline
    from flow_trl.toy.evaluation import generate
    from flow_trl.toy.scorer import score_batch

    pipe = load_shapes_pipeline()
    if lora is not None:
        pipe.load_lora_weights(lora)
    images = generate(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows])
    return score_batch(images, rows), images


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return mean, math.sqrt(var / n)


def summarize(results: dict[str, dict[str, list]], teacher_of: dict[str, str]) -> dict[str, Any]:
    """Per model: per-family and overall score (mean, se), quality; per student: paired diffs to each family's
    teacher."""
    from flow_trl.toy.world import TAGS

    summary: dict[str, Any] = {}
    for name, res in results.items():
        entry = {"score": mean_se(res["score"]), "strict": mean_se(res["strict"]), "quality": mean_se(res["quality"])}
        for tag in TAGS:
            entry[f"score/{tag}"] = mean_se([s for s, t in zip(res["score"], res["tag"]) if t == tag])
        if not name.startswith("teacher"):
            for tag in TAGS:
                teacher = results[f"teacher_{teacher_of[tag]}"]
                diffs = [s - u for s, u, t in zip(res["score"], teacher["score"], res["tag"]) if t == tag]
                entry[f"minus_teacher/{tag}"] = mean_se(diffs)
            base = results["base"]
            entry["minus_base"] = mean_se([s - u for s, u in zip(res["score"], base["score"])])
        summary[name] = entry
    return summary


def markdown_table(summary: dict[str, Any], minutes: dict[str, float], teacher_of: dict[str, str]) -> str:
    from flow_trl.toy.world import TAGS

    def fmt(pair, signed=False):
        return f"{pair[0]:+.3f} ± {pair[1]:.3f}" if signed else f"{pair[0]:.3f} ± {pair[1]:.3f}"

    head = "| model | minutes | " + " | ".join(TAGS) + " | overall | strict | quality |"
    lines = [head, "|" + "---|" * (len(TAGS) + 5)]
    for name, entry in summary.items():
        cells = [fmt(entry[f"score/{tag}"]) for tag in TAGS]
        cells += [fmt(entry["score"]), fmt(entry["strict"]), fmt(entry["quality"])]
        lines.append(f"| {name} | {minutes.get(name, 0):.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| student | " + " | ".join(f"{t} - teacher_{teacher_of[t]}" for t in TAGS) + " | overall - base |",
        "|" + "---|" * (len(TAGS) + 2),
    ]
    for name, entry in summary.items():
        if "minus_base" in entry and name != "base":
            cells = [fmt(entry[f"minus_teacher/{tag}"], signed=True) for tag in TAGS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(entry['minus_base'], signed=True)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/opd-bench")
    parser.add_argument("--teacher_steps", type=int, default=100, help="Optimizer steps per teacher (recipe: 100).")
    parser.add_argument("--teacher_dir", default=None, help="Reuse these teachers (default <output_dir>/teachers).")
    parser.add_argument("--student_steps", type=int, default=None,
                        help="Student optimizer steps (default: the recipe's, 30).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per optimizer step (recipe: 32).")
    parser.add_argument("--no_mar_student", type=lambda v: v.lower() == "true", default=True,
                        help="Also train the student without MAR (true/false).")
    parser.add_argument("--baselines", nargs="*", default=["nft"], choices=["nft"])
    parser.add_argument("--eval_per_family", type=int, default=96)
    parser.add_argument("--eval_seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from flow_trl.scripts import opd
    from flow_trl.toy.evaluation import evaluation_rows, save_image_grid
    from flow_trl.toy.world import TAGS

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    minutes: dict[str, float] = {}
    script_args, student_args = parse_recipe(opd, {"output_dir": str(out / "student")})
    script_args.teacher_max_steps = args.teacher_steps
    teacher_root = Path(args.teacher_dir or out / "teachers")
    teacher_of = {tag: name for name, tags in opd.SHAPES_TEACHER_FAMILIES.items() for tag in tags}
    teachers = {}
    for name, families in opd.SHAPES_TEACHER_FAMILIES.items():
        folder = teacher_root / name
        if not (folder / "pytorch_lora_weights.safetensors").is_file():
            start = time.time()
            opd.train_shapes_teacher(families, folder, script_args, student_args)
            minutes[f"teacher_{name}"] = (time.time() - start) / 60
        teachers.update({tag: str(folder) for tag in families})
    save_soup([str(teacher_root / name) for name in opd.SHAPES_TEACHER_FAMILIES], out / "soup")
    runs = {
        "opd_mar": ("opd", 0.04),
        **({"opd_no_mar": ("opd", 0.0)} if args.no_mar_student else {}),
        **{f"{kind}_multitask": (kind, 0.0) for kind in args.baselines},
    }
    for name, (kind, mar_coef) in runs.items():
        if not (out / name / "pytorch_lora_weights.safetensors").is_file():
            minutes[name] = train_student(kind, out / name, args.student_steps, teachers, mar_coef, args.batch_size)
    rows = [{**r, "seed": r["seed"] + args.eval_seed} for r in evaluation_rows(args.eval_per_family)]
    results, grid = {}, []
    picks = [t * args.eval_per_family + i for t in range(len(TAGS)) for i in range(2)]
    models = {
        "base": None,
        **{f"teacher_{n}": str(teacher_root / n) for n in opd.SHAPES_TEACHER_FAMILIES},
        "soup": str(out / "soup"),
        **{name: str(out / name) for name in runs},
    }
    for name, lora in models.items():
        results[name], images = evaluate(lora, rows)
        grid.append(images[picks])
    save_image_grid(torch.cat(grid), out / "grid.png", ncols=len(picks), labels=list(models))
    summary = summarize(results, teacher_of)
    table = markdown_table(summary, minutes, teacher_of)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({"summary": summary, "minutes": minutes, "args": vars(args)}, indent=1)
    )
    print(table)


if __name__ == "__main__":
    main()
