"""Train a DRM on shapes preference pairs and measure its held-out pairwise accuracy against the noise level.

    python benchmarks/drm_accuracy.py --output_dir runs/drm_v3
    python benchmarks/drm_accuracy.py --output_dir runs/drm_v3_x4 --cross_prompt_samples 4
    python benchmarks/drm_accuracy.py --output_dir runs/drm_v3_x4_k4 --pairs_dir runs/drm_v3_x4/pairs --num_blocks 4

(the three rows of docs/drm.md's accuracy table: `flow-trl drm`'s recipe, cross-prompt pairs, the full depth).

Pairs: the shipped base model samples every train (resp. held-out) prompt `--num_samples` times (ODE, distinct
seeds); two samples of one prompt whose shapes scores differ by at least `--min_gap` form a pair. The DRM (first
`--num_blocks` blocks of the base transformer + head) is trained on the train pairs with `DRMTrainer` and evaluated
on the held-out pairs at several sigmas with a fixed noise per pair, also on the clear ones (gap >= `--clear_gap`).
Saves the DRM to `<output_dir>/drm`, the curve to `--plot`, and prints the figures as JSON. The pairs are cached in
`--pairs_dir` (reused by later runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


SIGMAS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=4, help="Base-model samples per prompt.")
    parser.add_argument("--min_gap", type=float, default=0.25, help="Minimum shapes-score gap of a pair.")
    parser.add_argument("--clear_gap", type=float, default=0.5, help="Also report held-out pairs with this gap.")
    parser.add_argument("--cross_prompt_samples", type=int, default=0,
                        help="Train pairs only: samples of other prompts (same family) added to each prompt's pool.")
    parser.add_argument("--min_gap_train", type=float, default=0.0, help="Keep only train pairs with this gap.")
    parser.add_argument("--pairs_dir", default=None, help="Cache of the pairs (default: <output_dir>/pairs).")
    parser.add_argument("--sigma_max", type=float, default=1.0, help="Highest training sigma.")
    parser.add_argument("--num_blocks", type=int, default=2)
    parser.add_argument("--loss_type", default="bradley_terry")
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank on the backbone (0: full fine-tuning).")
    parser.add_argument("--max_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="runs/drm")
    parser.add_argument("--plot", default=None, help="PNG path of the accuracy-vs-sigma curve.")
    args = parser.parse_args()

    from flow_trl import DRMConfig, DRMTrainer
    from flow_trl.drm import sample_preference_pairs
    from flow_trl.toy import load_shapes_pipeline, split_prompts

    pipe = load_shapes_pipeline()
    start = time.time()
    cache = Path(args.pairs_dir or Path(args.output_dir) / "pairs")
    if (cache / "train").exists():
        from datasets import load_from_disk

        train, test = (load_from_disk(str(cache / split)) for split in ("train", "test"))
        for dataset in (train, test):
            dataset.set_format("torch", columns=["chosen_latents", "rejected_latents"], output_all_columns=True)
    else:
        train = sample_preference_pairs(
            pipe, split_prompts("train"), "shapes", args.num_samples, args.min_gap, seed=0,
            cross_prompt_samples=args.cross_prompt_samples, cross_prompt_column="tag",
        )
        test = sample_preference_pairs(
            pipe, split_prompts("test"), "shapes", args.num_samples, args.min_gap, seed=10**6
        )
        train.save_to_disk(str(cache / "train"))
        test.save_to_disk(str(cache / "test"))
    if args.min_gap_train > args.min_gap:
        train = train.filter(lambda r: r["chosen_score"] - r["rejected_score"] >= args.min_gap_train)
    data_minutes = (time.time() - start) / 60
    config = DRMConfig(
        output_dir=args.output_dir,
        num_blocks=args.num_blocks,
        loss_type=args.loss_type,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        logging_steps=50,
        save_strategy="no",
        seed=args.seed,
        eval_sigmas=SIGMAS,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        sigma_max=args.sigma_max,
    )
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r)
    trainer = DRMTrainer(pipe, args=config, train_dataset=train, eval_dataset=test, peft_config=peft_config)
    before = trainer.accuracy_by_sigma()
    start = time.time()
    trainer.train()
    train_minutes = (time.time() - start) / 60
    after = trainer.accuracy_by_sigma()
    clear = test.filter(lambda r: r["chosen_score"] - r["rejected_score"] >= args.clear_gap)
    after_clear = trainer.accuracy_by_sigma(clear)
    train_acc = trainer.accuracy_by_sigma(trainer.train_dataset, [0.0])[0.0]
    trainer.save_model(str(Path(args.output_dir) / "drm"))
    result = {
        "train_pairs": len(train),
        "test_pairs": len(test),
        "data_minutes": round(data_minutes, 2),
        "train_minutes": round(train_minutes, 2),
        "train_accuracy_clean": round(train_acc, 4),
        "test_accuracy_before": {str(s): round(a, 4) for s, a in before.items()},
        "test_accuracy": {str(s): round(a, 4) for s, a in after.items()},
        "clear_test_pairs": len(clear),
        "clear_test_accuracy": {str(s): round(a, 4) for s, a in after_clear.items()},
        "config": vars(args),
    }
    Path(args.output_dir, "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot(SIGMAS, [after[s] for s in SIGMAS], "o-", label=f"trained DRM, all {len(test)} pairs")
        ax.plot(SIGMAS, [after_clear[s] for s in SIGMAS], "s-", label=f"trained DRM, {len(clear)} clear pairs")
        ax.plot(SIGMAS, [before[s] for s in SIGMAS], "x--", color="grey", label="initial (random head)")
        ax.axhline(0.5, color="black", lw=0.6, ls=":")
        ax.set_xlabel("sigma of the shared noise (0 = clean, 1 = pure noise)")
        ax.set_ylabel("held-out pairwise accuracy")
        ax.set_title(f"DRM (K={args.num_blocks}) on held-out shapes pairs", fontsize=9)
        ax.set_ylim(0.3, 1.0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
