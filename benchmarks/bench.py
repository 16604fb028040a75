"""Side-by-side performance of vision_lora against Hugging Face PEFT's LoRA and full fine-tuning on the CPU.

One invocation measures, for each model, in alternating rounds so that machine drift cancels out:
  * training: full fine-tuning, head-only linear probe, PEFT LoRA and vision_lora LoRA (same targets, rank, alpha,
    head training), each variant in its own process so its peak memory is its own; median step time after warm-up,
    peak RSS, and the RSS growth during training;
  * checkpoints: bytes of a real Lightning checkpoint after one step, against the trainable-parameter bytes
    (+ AdamW state);
  * inference: base / vision_lora unmerged / merged, PEFT unmerged / merged at batch 1 and 16;
  * data: decoded+augmented images per second of ImageFolderDataModule against torchvision's ImageFolder with timm's
    transform, on digits-like JPEGs at 224 px.

    python benchmarks/bench.py                       # both default models, prints a table, writes JSON
    python benchmarks/bench.py --models vit_small_patch16_224 --rounds 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

DEFAULT_MODELS = ["vit_small_patch16_224", "tf_efficientnet_lite0"]
PARTS = ["train", "ckpt", "infer", "layer", "data"]
TRAIN_VARIANTS = ["full", "floor", "head", "peft", "vlora", "vlora_gc"]


# ------------------------------------------------------------------------------------------------------- children


def _setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def _targets(model) -> list[str]:
    from vision_lora.inject import LoRAConfig, resolve_targets

    return resolve_targets(model, LoRAConfig())


def _build(model_name: str, variant: str, num_classes: int, r: int, alpha: float):
    """The model of one variant, ready to train, and its trainable parameters."""
    import timm
    import torch

    from vision_lora import LoRAConfig, apply_lora
    from vision_lora.inject import classifier_names

    model = timm.create_model(model_name, num_classes=num_classes)
    head = classifier_names(model)
    if variant.startswith("full"):
        pass
    elif variant in ("head", "floor"):
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(h + ".") for h in head))
    elif variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        dora = variant == "peft_dora"
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=_targets(model), modules_to_save=head, use_dora=dora)
        model = get_peft_model(model, config)
    elif variant.startswith("vlora"):
        slices = "qkv" if "qkv" in variant else "qv"
        apply_lora(model, LoRAConfig(r=r, lora_alpha=alpha, qkv_slices=slices, use_dora="dora" in variant))
        if variant.endswith("_gc"):
            model.set_grad_checkpointing(True)
    else:
        raise ValueError(f"unknown variant {variant}")
    if _channels_last(model, variant):
        model.to(memory_format=torch.channels_last)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _channels_last(model, variant: str) -> bool:
    """vision_lora runs ConvNets channels-last by default (LoRAClassifier), and so does the floor it is measured
    against (the same frozen model in the same memory format); `full_cl` shows full fine-tuning so."""
    from vision_lora.module import is_convnet

    return variant == "full_cl" or ((variant.startswith("vlora") or variant == "floor") and is_convnet(model))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_train(args) -> dict:
    import torch
    import torch.nn.functional as F

    _setup(args.threads)
    model, params = _build(args.model, args.variant, args.num_classes, args.r, args.alpha)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if _channels_last(model, args.variant):
        x = x.contiguous(memory_format=torch.channels_last)
    if args.variant == "floor":  # frozen backbone, but input gradients all the way down: what LoRA cannot avoid
        x.requires_grad_(True)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    baseline = _rss_mb()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_times": times,
        "trainable_params": sum(p.numel() for p in params),
        "peak_rss_mb": peak,
        "train_rss_growth_mb": peak - baseline,
    }


def child_ckpt(args) -> dict:
    """Bytes of a real Lightning checkpoint after one optimizer step."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from vision_lora.module import LoRAClassifier

    _setup(args.threads)
    size = args.img_size
    data = DataLoader(TensorDataset(torch.randn(2, 3, size, size), torch.randint(0, args.num_classes, (2,))), 2)
    tmp = tempfile.TemporaryDirectory()
    if args.variant == "vlora":
        import timm

        # A pretrained backbone (here: a weights file) is rebuilt from its source, so checkpoints skip it.
        weights = str(Path(tmp.name) / "backbone.pth")
        torch.save(timm.create_model(args.model).state_dict(), weights)
        module = LoRAClassifier(
            args.model, weights=weights, num_classes=args.num_classes, r=args.r, lora_alpha=args.alpha
        )
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    else:

        class Plain(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model, self.params = _build(args.model, args.variant, args.num_classes, args.r, args.alpha)

            def training_step(self, batch, _):
                return F.cross_entropy(self.model(batch[0]), batch[1])

            def configure_optimizers(self):
                return torch.optim.AdamW(self.params, lr=1e-4)

        module = Plain()
        trainable = sum(p.numel() for p in module.params)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    path = Path(tmp.name) / "x.ckpt"
    trainer.save_checkpoint(path)
    nbytes = path.stat().st_size
    tmp.cleanup()
    return {"ckpt_bytes": nbytes, "trainable_params": trainable, "trainable_bytes_with_adam": trainable * 4 * 3}


def child_infer(args) -> dict:
    import copy

    import timm
    import torch
    from peft import LoraConfig, get_peft_model

    from vision_lora import LoRAConfig, apply_lora, merge_lora
    from vision_lora.inject import classifier_names, lora_layers

    _setup(args.threads)
    base = timm.create_model(args.model, num_classes=args.num_classes).eval()
    vl = copy.deepcopy(base)
    apply_lora(vl, LoRAConfig(r=args.r, lora_alpha=args.alpha))
    for layer in lora_layers(vl).values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained adapter is not zero
    vl_merged = merge_lora(copy.deepcopy(vl))
    dora = copy.deepcopy(base)
    apply_lora(dora, LoRAConfig(r=args.r, lora_alpha=args.alpha, use_dora=True))
    with torch.no_grad():
        for layer in lora_layers(dora).values():
            torch.nn.init.normal_(layer.lora_B, std=0.01)
            layer.lora_magnitude.mul_(1.05)
    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        target_modules=_targets(base),
        modules_to_save=classifier_names(base),
        init_lora_weights=False,
    )
    pf = get_peft_model(copy.deepcopy(base), cfg).eval()
    pf_merged = copy.deepcopy(pf).merge_and_unload().eval()
    models = {
        "base": base,
        "vlora_unmerged": vl.eval(),
        "vlora_merged": vl_merged.eval(),
        "vlora_dora_unmerged": dora.eval(),
        "peft_unmerged": pf,
        "peft_merged": pf_merged,
    }
    out = {}
    for batch in (1, 16):
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        reps = args.infer_reps if batch == 1 else max(3, args.infer_reps // 2)
        times = {k: [] for k in models}
        with torch.inference_mode():
            for m in models.values():
                m(x)
            for _ in range(reps):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m(x)
                    times[k].append(time.perf_counter() - t0)
        out[f"batch{batch}"] = {k: statistics.median(v) for k, v in times.items()}
    return out


def child_data(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    from vision_lora.data import ImageFolderDataModule

    _setup(args.threads)
    digits = load_digits()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (img, label) in enumerate(zip(digits.images[: args.data_images], digits.target, strict=False)):
            d = root / "train" / str(label)
            d.mkdir(parents=True, exist_ok=True)
            arr = (img * 255 / 16).astype(np.uint8)
            Image.fromarray(arr).resize((224, 224), Image.BICUBIC).convert("RGB").save(d / f"{i}.jpg", quality=90)
        kwargs = {"input_size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
        dm = ImageFolderDataModule(
            root=str(root), batch_size=32, num_workers=args.data_workers, val_fraction=0.1, preprocess=kwargs
        )
        dm.setup("fit")
        ours = dm.train_dataloader()
        tv = torch.utils.data.DataLoader(
            ImageFolder(
                str(root / "train"),
                transform=create_transform(
                    input_size=224, is_training=True, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"
                ),
            ),
            batch_size=32,
            shuffle=True,
            num_workers=args.data_workers,
        )
        rates = {"vision_lora": [], "torchvision": []}
        for _ in range(args.rounds):
            for name, loader in (("vision_lora", ours), ("torchvision", tv)):
                t0, n = time.perf_counter(), 0
                for batch in loader:
                    if name == "vision_lora":
                        batch = dm.on_before_batch_transfer(batch, 0)
                    n += batch[0].shape[0]
                rates[name].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def child_layer(args) -> dict:
    """Forward + backward of one adapted layer at ViT-S / EfficientNet shapes (batch 16), against the same layer
    frozen: the LoRA overhead itself, without the noise of a whole training step."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from vision_lora import LoRAConfig, apply_lora

    _setup(args.threads)

    class One(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.qkv = layer

        def forward(self, x):
            return self.qkv(x)

    cases = {
        "qkv Linear 384->1152, 3152 tokens": (nn.Linear(384, 1152), torch.randn(16, 197, 384)),
        "1x1 Conv2d 112->672, 14x14": (nn.Conv2d(112, 672, 1, bias=False), torch.randn(16, 112, 14, 14)),
        "1x1 Conv2d 112->672, 14x14, channels-last": (
            nn.Conv2d(112, 672, 1, bias=False).to(memory_format=torch.channels_last),
            torch.randn(16, 112, 14, 14).contiguous(memory_format=torch.channels_last),
        ),
    }
    out = {}
    for name, (layer, x0) in cases.items():
        frozen = One(layer).requires_grad_(False)
        models = {"frozen": frozen}
        for dora in (False, True):
            suffix = "_dora" if dora else ""
            config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=["qkv"], use_dora=dora)
            models[f"peft{suffix}"] = get_peft_model(copy.deepcopy(frozen), config).train()
            ours = copy.deepcopy(frozen)
            apply_lora(ours, LoRAConfig(r=args.r, lora_alpha=args.alpha, target_modules=["qkv"], use_dora=dora))
            models[f"vlora{suffix}"] = ours.train()
        times = {k: [] for k in models}
        for _ in range(args.layer_reps):
            for k, m in models.items():
                x = x0.clone().requires_grad_(True)
                t0 = time.perf_counter()
                m(x).sum().backward()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {
            "ms": {k: v * 1e3 for k, v in med.items()},
            "overhead_ms": {k: (med[k] - med["frozen"]) * 1e3 for k in models if k != "frozen"},
        }
    return out


CHILDREN = {"train": child_train, "ckpt": child_ckpt, "infer": child_infer, "data": child_data, "layer": child_layer}


# --------------------------------------------------------------------------------------------------------- driver


def _run_child(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    for key, value in {**vars(args), **extra}.items():
        if key in ("child", "models", "out", "variants", "parts") or value is None or value is False:
            continue
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{kind} {extra} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def run(args) -> dict:
    t_start = time.time()
    results = {
        "command": " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, torch threads={args.threads}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "models": {},
    }
    for model in args.models:
        variants = args.variants if "train" in args.parts else []
        train = {v: {"step_times": []} for v in variants}
        for rnd in range(args.rounds if variants else 0):
            for variant in variants:
                res = _run_child("train", args, model=model, variant=variant)
                train[variant]["step_times"].append(res.pop("step_times"))  # one list per round
                train[variant].setdefault("peak_rss_mb", []).append(res.pop("peak_rss_mb"))
                train[variant].setdefault("train_rss_growth_mb", []).append(res.pop("train_rss_growth_mb"))
                train[variant].update(res)
            print(f"[{time.time() - t_start:6.0f}s] {model}: training round {rnd + 1}/{args.rounds} done", flush=True)
        for v in train.values():
            v["median_step_s"] = statistics.median(t for round_times in v["step_times"] for t in round_times)
            v["peak_rss_mb"] = statistics.median(v["peak_rss_mb"])
            v["train_rss_growth_mb"] = statistics.median(v["train_rss_growth_mb"])
        ckpt = {}
        if "ckpt" in args.parts:
            ckpt = {v: _run_child("ckpt", args, model=model, variant=v) for v in ("full", "peft", "vlora")}
        infer = _run_child("infer", args, model=model) if "infer" in args.parts else {}
        print(f"[{time.time() - t_start:6.0f}s] {model}: checkpoints and inference done", flush=True)
        results["models"][model] = {"train": train, "ckpt": ckpt, "infer": infer, "ratios": _ratios(train, ckpt, infer)}
    if "layer" in args.parts:
        results["layer"] = _run_child("layer", args)
    if "data" in args.parts:
        results["data"] = _run_child("data", args)
    results["seconds"] = round(time.time() - t_start)
    return results


def _paired(train: dict, a: str, b: str) -> float:
    """Median over rounds of (a's median step / b's median step) in the same round: slow drift of the machine
    between rounds cancels out."""
    if a not in train or b not in train:
        return float("nan")
    per_round = [
        statistics.median(ta) / statistics.median(tb)
        for ta, tb in zip(train[a]["step_times"], train[b]["step_times"], strict=True)
    ]
    return round(statistics.median(per_round), 3)


def _ratios(train: dict, ckpt: dict, infer: dict) -> dict:
    mem = {k: v["train_rss_growth_mb"] for k, v in train.items()}
    out = {}
    if train:
        pairs = [("floor", "full"), ("peft", "full"), ("vlora", "full"), ("vlora", "peft"), ("vlora", "floor")]
        pairs += [("vlora_dora", "vlora"), ("peft_dora", "vlora"), ("peft_dora", "peft"), ("vlora_dora", "floor")]
        for a, b in pairs:
            out[f"{a}_step/{b}_step"] = _paired(train, a, b)
        out["vlora_train_mem/peft_train_mem"] = _ratio(mem.get("vlora", 0), mem.get("peft", 0))
        out["vlora_gc_train_mem/peft_train_mem"] = _ratio(mem.get("vlora_gc", 0), mem.get("peft", 0))
    for k in ckpt:
        out[f"{k}_ckpt/trainable+adam"] = _ratio(ckpt[k]["ckpt_bytes"], ckpt[k]["trainable_bytes_with_adam"])
    for batch, t in infer.items():
        for k in ("vlora_unmerged", "vlora_merged", "vlora_dora_unmerged", "peft_unmerged", "peft_merged"):
            if k in t:
                out[f"{k}/base@{batch}"] = _ratio(t[k], t["base"])
    return out


def table(results: dict) -> str:
    lines = [f"vision_lora benchmark, {results['date']}, {results['machine']}", f"command: {results['command']}", ""]
    for model, r in results["models"].items():
        lines.append(f"## {model}")
        lines.append(
            f"{'variant':<10} {'trainable':>11} {'step s':>8} {'/full':>6} {'peak RSS MB':>12} {'train +MB':>10}"
        )
        full = r["train"].get("full", {}).get("median_step_s")
        for name, v in r["train"].items():
            rel = f"{v['median_step_s'] / full:.3f}" if full else "-"
            lines.append(
                f"{name:<10} {v['trainable_params']:>11,} {v['median_step_s']:>8.3f} {rel:>6} "
                f"{v['peak_rss_mb']:>12.0f} {v['train_rss_growth_mb']:>10.0f}"
            )
        lines.append(
            "checkpoint bytes: " + ", ".join(f"{k} {v['ckpt_bytes'] / 1e6:.2f} MB" for k, v in r["ckpt"].items())
        )
        for batch, t in r["infer"].items():
            lines.append(f"inference {batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()))
        lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in r["ratios"].items()))
        lines.append("")
    for name, r in results.get("layer", {}).items():
        lines.append(
            f"one layer fwd+bwd, {name}: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items())
            + "; LoRA overhead "
            + ", ".join(f"{k} +{v:.2f} ms" for k, v in r["overhead_ms"].items())
        )
    if "data" in results:
        d = results["data"]
        lines.append(
            "data pipeline (images/s, 224 px JPEG, train augmentation): "
            + ", ".join(f"{k} {v:.1f}" for k, v in d.items())
            + f", ratio {_ratio(d['vision_lora'], d['torchvision'])}"
        )
    lines.append(f"total {results['seconds']} s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument(
        "--variants",
        nargs="+",
        default=TRAIN_VARIANTS,
        help=f"training variants: {TRAIN_VARIANTS}, vlora_qkv (all of q, k, v), full_cl (channels-last), vlora_dora "
        "and peft_dora (DoRA)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds of every variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process and round")
    p.add_argument("--infer-reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-images", type=int, default=320)
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="what to measure (default: everything)")
    p.add_argument("--layer-reps", type=int, default=40)
    p.add_argument("--out", default="benchmarks/results/results.json")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    results = run(args)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nJSON written to {args.out}")


if __name__ == "__main__":
    main()
