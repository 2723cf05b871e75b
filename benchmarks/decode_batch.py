"""Time the VAE decoding of one rollout's latents at several `decode_batch_size` values.

    python benchmarks/decode_batch.py --num_latents 64 --batch_sizes 0 32 16 8 4
    OMP_NUM_THREADS=1 python benchmarks/decode_batch.py --num_latents 16 --batch_sizes 0 \
        --memory_formats contiguous channels_last --repeats 10

(docs/benchmarks.md, "Decoding in chunks" and "Per-iteration cost"; `--repeats` sets the decodes timed per size.)

Decodes `--num_latents` random latents of the embedded shapes pipeline (64x64 images) through the trainers' model
adapter, `--repeats` times per batch size after one warm-up call (0: the whole batch in one VAE call), with the VAE's
weights and the latents in each of `--memory_formats` (torch's default `contiguous`, or `channels_last`), and prints
the mean seconds per decode, the speed-up over the first and the largest pixel difference from it, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_latents", type=int, default=64, help="Latents per decode (a rollout of 2 x 32).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[0, 32, 16, 8, 4],
                        help="decode_batch_size values to time (0: no split).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed decodes per batch size.")
    parser.add_argument("--memory_formats", nargs="+", default=["contiguous"], choices=["contiguous", "channels_last"],
                        help="Memory layouts of the VAE and the latents to time.")
    args = parser.parse_args()

    from flow_trl.models import get_adapter
    from flow_trl.toy import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    latents = get_adapter(pipe).initial_noise(
        args.num_latents, 64, 64, torch.Generator().manual_seed(0), torch.float32
    )
    reference, baseline = None, None
    for memory_format in args.memory_formats:
        layout = getattr(torch, f"{memory_format}_format")
        pipe.vae.to(memory_format=layout)
        for size in args.batch_sizes:
            adapter = get_adapter(pipe, decode_batch_size=size or None)
            with torch.no_grad():
                images = adapter.decode(latents.contiguous(memory_format=layout))
                start = time.perf_counter()
                for _ in range(args.repeats):
                    adapter.decode(latents.contiguous(memory_format=layout))
            seconds = (time.perf_counter() - start) / args.repeats
            reference = images if reference is None else reference
            baseline = seconds if baseline is None else baseline
            print(json.dumps({
                "memory_format": memory_format,
                "decode_batch_size": size or None,
                "seconds": round(seconds, 4),
                "speedup_over_first": round(baseline / seconds, 2),
                "max_abs_diff_from_first": float((images - reference).abs().max()),
                "threads": torch.get_num_threads(),
            }))


if __name__ == "__main__":
    main()
