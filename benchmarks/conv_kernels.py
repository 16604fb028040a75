"""The conv LoRA training kernels against the frozen floor and PEFT, and eval-mode unmerged inference against the
plain timm model. Every figure is a ratio measured in interleaved rounds: the median of the per-round ratios, with
the upper quartile beside it.

  * layer: forward + backward of one 1x1 conv (batch 16, channels-last) at EfficientNet-Lite0's shapes and a few
    wider ones: frozen (the floor), the thin rank-r GEMMs (`sliced_linear`) and the weight-gradient kernel
    (`folded_conv2d`); the evidence for `weight_gradient_is_cheaper`.
  * train: whole training steps (bench.py's child processes: floor in channels-last for ConvNets, vision_lora and
    PEFT LoRA, r=8, alpha=16, the family preset and a trained head), each variant in its own process per round.
  * infer: the adapted model in eval mode with the fold cache (unmerged, torch.no_grad) against the plain timm model,
    batch 1 and 16, alternating calls.

    python benchmarks/conv_kernels.py                     # everything, writes benchmarks/results/kernels.json
    python benchmarks/conv_kernels.py --parts layer --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info  # noqa: E402

# (in, out, spatial) of EfficientNet-Lite0's adapted 1x1 convs, then wider layers where G's flops dominate.
LAYER_SHAPES = [
    (32, 16, 112),
    (16, 96, 112),
    (96, 24, 56),
    (24, 144, 56),
    (144, 24, 56),
    (144, 40, 28),
    (40, 240, 28),
    (240, 80, 14),
    (80, 480, 14),
    (480, 80, 14),
    (112, 672, 14),
    (672, 112, 14),
    (672, 192, 7),
    (192, 1152, 7),
    (1152, 192, 7),
    (1152, 320, 7),
    (320, 1280, 7),
    (512, 2048, 7),
    (2048, 512, 7),
    (1024, 1024, 14),
]
TRAIN = {"tf_efficientnet_lite0": ["floor", "vlora", "peft"], "vit_small_patch16_224": ["floor", "vlora"]}
INFER_MODELS = ["vit_small_patch16_224", "tf_efficientnet_lite0"]


def _summary(ratios: list[float]) -> dict:
    """Median and upper quartile of per-round ratios."""
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": round(statistics.median(ratios), 3), "upper_quartile": round(q[2], 3), "rounds": len(ratios)}


def _layer_variants(ci: int, co: int, r: int, s: float) -> dict:
    """Forward callables of one channels-last 1x1 conv: frozen, thin adapter GEMMs, weight-gradient kernel."""
    import torch
    import torch.nn.functional as F

    from vision_lora.lora.kernels import folded_conv2d, sliced_linear

    w = torch.randn(co, ci, 1, 1).contiguous(memory_format=torch.channels_last)
    a = torch.randn(r, ci, 1, 1, requires_grad=True)
    b = torch.randn(co, r, 1, 1, requires_grad=True)

    def thin(x):
        xl = x.permute(0, 2, 3, 1)  # (N, H, W, in)
        y = sliced_linear(xl, w.view(co, ci), None, a.view(1, r, ci), b.view(1, co, r), s, 1, ((0, co),))
        return y.permute(0, 3, 1, 2)

    return {
        "floor": lambda x: F.conv2d(x, w),
        "thin": thin,
        "weight_grad": lambda x: folded_conv2d(x, w, None, a, b, s, (1, 1), (0, 0), (1, 1)),
    }


def layer_part(args) -> dict:
    import torch

    from vision_lora.lora.kernels import weight_gradient_is_cheaper

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {}
    for ci, co, hw in LAYER_SHAPES:
        variants = _layer_variants(ci, co, args.r, args.alpha / args.r)
        x0 = torch.randn(args.batch_size, ci, hw, hw).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(args.batch_size, co, hw, hw).contiguous(memory_format=torch.channels_last)
        times = {k: [] for k in variants}
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for k, f in variants.items():
                ts = []
                for _ in range(args.layer_reps):
                    x = x0.clone().requires_grad_(True)
                    t0 = time.perf_counter()
                    f(x).backward(gy)
                    ts.append(time.perf_counter() - t0)
                if rnd:
                    times[k].append(statistics.median(ts))
        name = f"{ci}->{co} {hw}x{hw}"
        out[name] = {
            "ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()},
            "thin/floor": _summary([t / f for t, f in zip(times["thin"], times["floor"], strict=True)]),
            "weight_grad/floor": _summary([t / f for t, f in zip(times["weight_grad"], times["floor"], strict=True)]),
            "weight_grad/thin": _summary([t / f for t, f in zip(times["weight_grad"], times["thin"], strict=True)]),
            "rule_picks_weight_grad": weight_gradient_is_cheaper(ci, co, args.r),
        }
        print(f"layer {name}: {out[name]}", flush=True)
    return out


def train_part(args) -> dict:
    import bench

    child = argparse.Namespace(
        batch_size=args.batch_size,
        img_size=224,
        num_classes=100,
        r=args.r,
        alpha=args.alpha,
        warmup=args.warmup,
        steps=args.steps,
        threads=args.threads,
    )
    out = {}
    for model in args.models:
        variants = TRAIN[model]
        steps = {v: [] for v in variants}  # median step of each round
        for rnd in range(args.rounds):
            for v in variants:
                steps[v].append(
                    statistics.median(bench._run_child("train", child, model=model, variant=v)["step_times"])
                )
            print(
                f"train {model} round {rnd + 1}: " + ", ".join(f"{v} {steps[v][-1]:.3f} s" for v in variants),
                flush=True,
            )
        res = {"median_step_s": {v: round(statistics.median(t), 4) for v, t in steps.items()}}
        for a, b in (("vlora", "floor"), ("vlora", "peft"), ("peft", "floor")):
            if a in steps and b in steps:
                res[f"{a}/{b}"] = _summary([x / y for x, y in zip(steps[a], steps[b], strict=True)])
        out[model] = res
    return out


def infer_part(args) -> dict:
    import copy

    import timm
    import torch

    from vision_lora import LoRAConfig, apply_lora
    from vision_lora.inject import lora_layers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {}
    for model in INFER_MODELS:
        base = timm.create_model(model, num_classes=100).eval()
        adapted = copy.deepcopy(base)
        apply_lora(adapted, LoRAConfig(r=args.r, lora_alpha=args.alpha))
        for layer in lora_layers(adapted).values():
            torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained adapter is not zero
        adapted.eval()
        models = {"base": base, "unmerged": adapted}
        res = {}
        for batch in (1, 16):
            x = torch.randn(batch, 3, 224, 224)
            reps = args.infer_reps if batch == 1 else max(3, args.infer_reps // 4)
            medians = {k: [] for k in models}
            with torch.no_grad():
                for m in models.values():
                    m(x)
                for _ in range(args.rounds):
                    ts = {k: [] for k in models}
                    for _ in range(reps):
                        for k, m in models.items():
                            t0 = time.perf_counter()
                            m(x)
                            ts[k].append(time.perf_counter() - t0)
                    for k in models:
                        medians[k].append(statistics.median(ts[k]))
            res[f"batch{batch}"] = {
                "ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in medians.items()},
                "unmerged/base": _summary([u / b for u, b in zip(medians["unmerged"], medians["base"], strict=True)]),
            }
            print(f"infer {model} batch {batch}: {res[f'batch{batch}']}", flush=True)
        out[model] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["layer", "train", "infer"], choices=["layer", "train", "infer"])
    p.add_argument("--models", nargs="+", default=list(TRAIN), choices=list(TRAIN), help="models of the train part")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (ratios: median over rounds)")
    p.add_argument("--batch-size", type=int, default=16, help="batch of the layer and train parts")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per training process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per training process")
    p.add_argument("--layer-reps", type=int, default=5, help="timed fwd+bwd per layer variant and round")
    p.add_argument("--infer-reps", type=int, default=12, help="timed batch-1 calls per model and round (batch 16: /4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    args = p.parse_args()
    t0 = time.time()
    results = {
        "command": " ".join(["python", "benchmarks/conv_kernels.py", *sys.argv[1:]]),
        "date": str(date.today()),
        "machine": machine_info(threads=args.threads),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    parts = {"layer": layer_part, "train": train_part, "infer": infer_part}
    for part in args.parts:
        results[part] = parts[part](args)
        print(f"[{time.time() - t0:.0f} s] {part} done", flush=True)
    results["seconds"] = round(time.time() - t0)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"JSON written to {args.out}")


if __name__ == "__main__":
    main()
