"""Where a training step's time goes: torch.profiler over a few steps of one or more bench.py variants.

    python benchmarks/profile_step.py                                   # ViT-S: floor, peft, vlora
    python benchmarks/profile_step.py --model tf_efficientnet_lite0 --variants peft vlora --rows 20

Prints, per variant, the step time and the operators with the most self CPU time, so the difference between two
variants can be read off operator by operator.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench  # noqa: E402


def profile(model_name: str, variant: str, args) -> tuple[float, str]:
    """Median step time of ``variant`` and its profiler table (self CPU time, top ``args.rows`` operators)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    bench._setup(args.threads)
    model, params = bench._build(model_name, variant, args.num_classes, args.r, args.alpha)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if bench._channels_last(model, variant):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(variant == "floor")
    y = torch.randint(0, args.num_classes, (args.batch_size,))

    def step() -> float:
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        times = sorted(step() for _ in range(args.steps))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48)
    return times[len(times) // 2], table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--variants", nargs="+", default=["floor", "peft", "vlora"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    for variant in args.variants:
        median, table = profile(args.model, variant, args)
        print(f"\n## {args.model} / {variant}: median step {median:.3f} s over {args.steps} profiled steps\n{table}")


if __name__ == "__main__":
    main()
