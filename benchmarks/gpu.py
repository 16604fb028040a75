"""Everything a lent GPU should measure, in one command, within 8 minutes: LoRA training throughput and memory beside
PEFT and full fine-tuning, torch.compile on and off, the CPU cores needed to feed the GPU, the merged model's batched
inference in PyTorch and onnxruntime, and export parity on GPU tensors.

    python benchmarks/gpu.py                    # on the GPU; writes benchmarks/results/gpu.json after each section
    python benchmarks/gpu.py --smoke --out /tmp/gpu.json    # every section on the CPU with tiny models (a test)

Sections (docs/gpu.md says what each measures):
  machine  GPU name, torch / CUDA / timm versions, the CPU and its flags
  train    per model, bf16 autocast: vision_lora LoRA, PEFT LoRA (same targets, rank, alpha; head trained), full
           fine-tuning, and vision_lora LoRA with torch.compile of the backbone forward (as `--model.compile`):
           images/s after warm-up and peak torch.cuda.max_memory_allocated
  data     images/s of one CPU core decoding + augmenting camera-size JPEGs for 224 px training: the image folder
           (reduced-scale decode, and full decode) and the optimized LitData dataset (skipped without litdata)
  export   the merged model to ONNX (vision_lora.deploy.onnx), then on GPU tensors: merged vs unmerged PyTorch logits,
           and onnxruntime (CUDA provider where present) vs merged
  infer    the merged model's forward at batch 1 / 16 / 64: PyTorch fp32 and bf16, onnxruntime's CUDA provider
  summary  cores needed = training images/s / images/s of one core, for each source

Weights are random (the device reaches no hub); speed and memory do not depend on them. Only torch, timm and the
Lightning-free parts of vision_lora are required; peft, litdata, onnx and onnxruntime are used where installed and
their parts are recorded as "skipped: <reason>" otherwise. Each section runs under its own time limit; one that runs
out keeps what it finished and records the timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import gc
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing it (the lent device)
    sys.path.insert(0, str(REPO))

from vision_lora.lora import (  # noqa: E402 - after the path line above
    LoRAConfig,
    apply_lora,
    classifier_names,
    lora_layers,
    merge_lora,
    resolve_targets,
)
from vision_lora.weights import create_backbone  # noqa: E402

VARIANTS = ("vlora", "peft", "full", "vlora_compile")


@dataclass
class Settings:
    """What one run measures; `--smoke` swaps in tiny models, the CPU and a few steps."""

    device: str
    models: tuple[str, ...]
    variants: tuple[str, ...]
    batch_size: int
    warmup: int
    steps: int
    bf16: bool
    compile_backend: str
    compile_models: tuple[str, ...]
    r: int
    lora_alpha: float
    num_classes: int
    infer_batches: tuple[int, ...]
    infer_reps: int
    export_model: str
    photos: int
    photo_size: tuple[int, int]
    data_seconds: float
    limits: dict[str, float]


def settings(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(
            device="cpu",
            models=("test_vit", "test_convnext"),
            variants=VARIANTS,
            batch_size=2,
            warmup=1,
            steps=1,
            bf16=False,
            compile_backend="eager",  # Dynamo's graph capture without code generation: seconds, not minutes
            compile_models=("test_vit",),
            r=4,
            lora_alpha=8.0,
            num_classes=10,
            infer_batches=(1, 4),
            infer_reps=2,
            export_model="test_vit",
            photos=6,
            photo_size=(480, 360),
            data_seconds=0.2,
            limits={"train": 120, "data": 60, "export": 120, "infer": 60},
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Settings(
        device=device,
        models=tuple(args.models),
        variants=tuple(args.variants),
        batch_size=args.batch_size,
        warmup=3,
        steps=args.steps,
        bf16=device == "cuda",
        compile_backend="inductor",
        compile_models=tuple(args.models),
        r=8,
        lora_alpha=16.0,
        num_classes=100,
        infer_batches=(1, 16, 64),
        infer_reps=20,
        export_model=args.models[0],
        photos=12,
        photo_size=(4000, 3000),
        data_seconds=4.0,
        limits={"train": 135, "data": 60, "export": 90, "infer": 60},  # train: per model; 480 s in all
    )


# --------------------------------------------------------------------------------------------------------- running


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds`; should a C call never return, faulthandler ends the
    process a minute later (the JSON of the finished sections is on disk by then)."""

    def expire(signum, frame):
        raise SectionTimeout(f"timeout after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 60, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def write_json(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, out)


def run_section(results: dict, key: str, limit: float, fn, *args) -> None:
    """`fn(store, *args)` fills `store`, kept in `results[key]` even when it times out or fails."""
    store: dict[str, Any] = {}
    results[key] = store
    start = time.perf_counter()
    try:
        with time_limit(limit):
            fn(store, *args)
    except SectionTimeout as err:
        store["skipped"] = f"{err} (limit of this section); the entries above finished"
    except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
        store["error"] = f"{type(err).__name__}: {err}"
        store["traceback"] = traceback.format_exc()[-2000:]
    store["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[{key}] {store['seconds']:.1f} s: {json.dumps(_brief(store), default=float)[:400]}", flush=True)


def _brief(store: dict) -> dict:
    return {k: v for k, v in store.items() if k != "traceback"}


def skipped(err: BaseException) -> str:
    return f"skipped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------- machine


def machine(store: dict, s: Settings) -> None:
    store["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    store["python"] = platform.python_version()
    store["torch"] = torch.__version__
    store["torch_cuda"] = torch.version.cuda or "none"
    store["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    store["timm"] = timm.__version__
    store["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        store["gpu"] = props.name
        store["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        store["gpu_capability"] = f"{props.major}.{props.minor}"
        store["gpu_count"] = torch.cuda.device_count()
    else:
        store["gpu"] = "skipped: no CUDA device"
    store["cpu_count"] = os.cpu_count()
    store["cpu_affinity"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        store["cpu_model"] = fields.get("model name", platform.processor() or "unknown")
        store["cpu_flags"] = fields.get("flags", fields.get("Features", ""))
    except OSError as err:
        store["cpu_model"] = store["cpu_flags"] = skipped(err)
    for name in ("peft", "litdata", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "lightning"):
        try:
            store[name] = importlib.metadata.version(name)  # without importing it
        except importlib.metadata.PackageNotFoundError:
            store[name] = "skipped: not installed"
    try:
        import onnxruntime

        store["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as err:
        store["onnxruntime_providers"] = skipped(err)
    store["settings"] = asdict(s)


# ----------------------------------------------------------------------------------------------------------- train


def _is_convnet(model: torch.nn.Module) -> bool:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def _input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))


def build(name: str, variant: str, s: Settings) -> tuple[torch.nn.Module, Any]:
    """The model of one variant on the device, and the callable a step runs (the compiled forward for *_compile)."""
    model = create_backbone(name, num_classes=s.num_classes, weights="random")
    if variant.startswith("vlora"):
        apply_lora(model, LoRAConfig(r=s.r, lora_alpha=s.lora_alpha))
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        targets = resolve_targets(model, LoRAConfig())
        config = LoraConfig(
            r=s.r, lora_alpha=s.lora_alpha, target_modules=targets, modules_to_save=classifier_names(model)
        )
        model = get_peft_model(model, config)
    elif variant != "full":
        raise ValueError(f"unknown variant {variant}")
    model = model.to(s.device).train()
    if _is_convnet(model):  # as LoRAClassifier does for ConvNets, for every variant alike
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model.forward, backend=s.compile_backend) if variant.endswith("_compile") else model
    return model, forward


def train_variant(name: str, variant: str, s: Settings) -> dict:
    model, forward = build(name, variant, s)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=s.device == "cuda")
    x = torch.randn(s.batch_size, *_input_size(model), device=s.device)
    if _is_convnet(model):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=s.device)

    def step() -> None:
        with torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(s.warmup):
        step()
    _sync(s.device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(s.steps):
        step()
    _sync(s.device)
    seconds = time.perf_counter() - start
    out = {
        "images_per_s": s.batch_size * s.steps / seconds,
        "step_ms": 1e3 * seconds / s.steps,
        "warmup_s": warmup,
        "trainable_params": sum(p.numel() for p in params),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30
        if s.device == "cuda"
        else "skipped: no CUDA device (torch.cuda.max_memory_allocated)",
    }
    return out


def train(store: dict, name: str, s: Settings) -> None:
    store["batch_size"] = s.batch_size
    store["precision"] = "bf16 autocast, fp32 weights" if s.bf16 else "fp32"
    store["compile_backend"] = s.compile_backend
    for variant in s.variants:
        if variant.endswith("_compile") and name not in s.compile_models:
            store[variant] = f"skipped: compiled for {', '.join(s.compile_models)} only (--smoke keeps to seconds)"
            continue
        try:
            store[variant] = train_variant(name, variant, s)
        except ImportError as err:  # peft missing
            store[variant] = skipped(err)
        finally:
            torch._dynamo.reset()
            _free(s.device)  # the variant's model and optimizer, before the next one's peak is measured
        print(f"  {name} {variant}: {store[variant]}", flush=True)
    for variant in s.variants:
        ours, other = store.get("vlora"), store.get(variant)
        if variant != "vlora" and isinstance(ours, dict) and isinstance(other, dict):
            store[f"vlora_speed/{variant}_speed"] = ours["images_per_s"] / other["images_per_s"]


# ------------------------------------------------------------------------------------------------------------ data


def make_photos(root: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`root/train/<class>/<i>.jpg`: smooth photo-like images (gradients, mild noise), each a shifted copy of one,
    JPEG quality 90."""
    width, height = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(xx / width * 7.0),
            127 + 100 * np.cos(yy / height * 5.0),
            127 + 100 * np.sin((xx + yy) / (width + height) * 11.0),
        ],
        axis=-1,
    )
    base = np.clip(base + rng.normal(0, 6, (height, width, 1)), 0, 255).astype(np.uint8)
    paths = []
    for i in range(count):
        folder = root / "train" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.jpg"
        Image.fromarray(np.roll(base, i * width // count, axis=1)).save(path, quality=90)
        paths.append(path)
    return paths


def _rate(epoch, seconds: float) -> float:
    """Images per second over whole passes of `epoch()` (an iterable of decoded, augmented images), repeated until
    `seconds` have passed."""
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        for _ in epoch():
            count += 1
    return count / (time.perf_counter() - start)


def data(store: dict, s: Settings, tmp: Path) -> None:
    from timm.data import create_transform

    from vision_lora.data.decode import ImagePipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the rate a DataLoader worker gives
    try:
        photos = make_photos(tmp / "photos", s.photos, s.photo_size)
        store["images"] = f"{len(photos)} JPEGs of {s.photo_size[0]}x{s.photo_size[1]}, quality 90"
        store["transform"] = "timm train transform at 224 px (random-resized crop, flip, colour jitter 0.4)"
        transform = create_transform(input_size=(3, 224, 224), is_training=True, color_jitter=0.4)
        fast, full = ImagePipeline(transform), ImagePipeline(transform, reduce=False)
        store["folder_per_core"] = _rate(lambda: map(fast, photos), s.data_seconds)
        store["folder_full_decode_per_core"] = _rate(lambda: map(full, photos), s.data_seconds)
        try:
            import litdata  # noqa: F401
        except ImportError as err:
            store["optimized_per_core"] = skipped(err)
            return
        from vision_lora.data.folder import FolderSource
        from vision_lora.data.streaming import optimize_folder, streaming_dataset

        optimized = tmp / "optimized"
        optimize_folder(FolderSource(tmp / "photos", val_fraction=0.2), optimized, max_side=512, num_workers=2)
        dataset = streaming_dataset(str(optimized / "train"), ImagePipeline(transform), shuffle=True)
        store["optimized_max_side"] = 512
        store["optimized_per_core"] = _rate(lambda: iter(dataset), s.data_seconds)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- export and infer


def adapted_model(s: Settings) -> torch.nn.Module:
    """The export model with LoRA whose B is not zero (as after training), in eval mode on the CPU."""
    torch.manual_seed(0)
    model = create_backbone(s.export_model, num_classes=s.num_classes, weights="random")
    apply_lora(model, LoRAConfig(r=s.r, lora_alpha=s.lora_alpha))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    return model.eval()


def _ort_session(path: Path):
    """An onnxruntime session on the CUDA provider where there is one, else the CPU provider; and its provider."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    return session, session.get_providers()[0]


def _ort_run(session, provider: str, x: torch.Tensor) -> torch.Tensor:
    """Logits of `x`; on the CUDA provider bound to the GPU tensors themselves (no host copies)."""
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
    if provider != "CUDAExecutionProvider":
        return torch.from_numpy(session.run([output], {name: x.cpu().numpy()})[0])
    x = x.contiguous()
    binding = session.io_binding()
    binding.bind_input(name, "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
    binding.bind_output(output, "cuda")
    session.run_with_iobinding(binding)
    return torch.from_numpy(binding.copy_outputs_to_cpu()[0])


def export(store: dict, s: Settings, tmp: Path) -> None:
    model = adapted_model(s)
    x = torch.randn(8, *_input_size(model), generator=torch.Generator().manual_seed(1)).to(s.device)
    unmerged = copy.deepcopy(model).to(s.device)
    merged = merge_lora(copy.deepcopy(model)).to(s.device)
    with torch.no_grad():
        reference, merged_logits = unmerged(x), merged(x)
    store["model"] = s.export_model
    store["device"] = s.device
    store["merged_vs_unmerged_max_abs_diff"] = (merged_logits - reference).abs().max().item()
    store["merged_vs_unmerged_top1_agreement"] = (merged_logits.argmax(1) == reference.argmax(1)).float().mean().item()
    try:
        from vision_lora.deploy.onnx import export_onnx
    except ImportError as err:
        store["onnx"] = skipped(err)
        return
    path = tmp / "merged.onnx"
    report = export_onnx(model, path, batch_sizes=(1, 3))
    store["onnx_export_s"] = report.export_seconds
    store["onnx_mb"] = report.size_bytes / 1e6
    store["onnx_cpu_verify_max_abs_diff"] = max(report.max_abs_diff.values())
    session, provider = _ort_session(path)
    store["onnxruntime_provider"] = provider
    onnx_logits = _ort_run(session, provider, x)
    merged_cpu = merged_logits.float().cpu()
    store["onnx_vs_merged_max_abs_diff"] = (onnx_logits - merged_cpu).abs().max().item()
    store["onnx_vs_merged_top1_agreement"] = (onnx_logits.argmax(1) == merged_cpu.argmax(1)).float().mean().item()
    store["onnx_path"] = str(path)


def _latency(run, x: torch.Tensor, reps: int, device: str) -> float:
    """Median seconds of `run(x)` after two warm-up calls."""
    for _ in range(2):
        run(x)
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def infer(store: dict, s: Settings, onnx_path: str | None) -> None:
    model = merge_lora(adapted_model(s)).to(s.device)
    store["model"] = f"{s.export_model}, LoRA merged"
    shape = _input_size(model)
    session = provider = None
    if onnx_path is None:
        store["onnxruntime"] = "skipped: no ONNX file (see the export section)"
    else:
        try:
            session, provider = _ort_session(Path(onnx_path))
        except ImportError as err:
            store["onnxruntime"] = skipped(err)
        else:
            if provider != "CUDAExecutionProvider":
                session = None
                store["onnxruntime"] = "skipped: onnxruntime has no CUDA provider here (onnxruntime-gpu not installed)"
    for batch in s.infer_batches:
        x = torch.randn(batch, *shape, device=s.device)
        row: dict[str, Any] = {}
        with torch.inference_mode():
            row["pytorch_fp32_ms"] = 1e3 * _latency(model, x, s.infer_reps, s.device)
            if s.bf16:

                def bf16(x):
                    with torch.autocast(s.device, dtype=torch.bfloat16):
                        return model(x)

                row["pytorch_bf16_ms"] = 1e3 * _latency(bf16, x, s.infer_reps, s.device)
            else:
                row["pytorch_bf16_ms"] = "skipped: bf16 autocast is measured on the GPU only"
        if session is not None:
            row["onnxruntime_cuda_ms"] = 1e3 * _latency(
                lambda x: _ort_run(session, provider, x), x, s.infer_reps, "cuda"
            )
        for key in [k for k, v in row.items() if isinstance(v, float)]:
            row[key.replace("_ms", "_images_per_s")] = batch / (row[key] / 1e3)
        store[f"batch{batch}"] = row


# --------------------------------------------------------------------------------------------------------- summary


def summary(store: dict, results: dict) -> None:
    """Cores needed to feed training = training images/s ÷ images/s of one core, per model, variant and source."""
    # The device needs no Lightning: nothing measured here imports it.
    store["lightning_imported"] = any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules)
    data = results.get("data", {})
    rates = {k.removesuffix("_per_core"): v for k, v in data.items() if k.endswith("_per_core")}
    for key, section in results.items():
        if not key.startswith("train/"):
            continue
        model = key.removeprefix("train/")
        for variant, row in section.items():
            if not isinstance(row, dict):
                continue
            for source, rate in rates.items():
                name = f"cores_needed/{model}/{variant}/{source}"
                ok = isinstance(rate, float) and rate > 0
                store[name] = row["images_per_s"] / rate if ok else f"skipped: no {source} rate (see data)"


# ------------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every section on the CPU with tiny models, in seconds")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "convnext_tiny"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--sections", nargs="+", default=["train", "data", "export", "infer"])
    args = p.parse_args(argv)
    s = settings(args)
    out = Path(args.out)
    started = time.perf_counter()
    command = " ".join(["python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, Any] = {"command": command}
    with tempfile.TemporaryDirectory(prefix="vision_lora_gpu_") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("LITDATA_CACHE_DIR", str(tmp / "litdata_cache"))  # read when litdata is imported
        if "data" in args.sections:  # first: LitData's optimize forks its workers, best before CUDA starts
            run_section(results, "data", s.limits["data"], data, s, tmp)
            write_json(results, out)
        run_section(results, "machine", 30, machine, s)
        write_json(results, out)
        for model in s.models if "train" in args.sections else ():
            run_section(results, f"train/{model}", s.limits["train"], train, model, s)
            write_json(results, out)
        if "export" in args.sections:
            run_section(results, "export", s.limits["export"], export, s, tmp)
            write_json(results, out)
        if "infer" in args.sections:
            onnx_path = results.get("export", {}).get("onnx_path")
            run_section(results, "infer", s.limits["infer"], infer, s, onnx_path)
            write_json(results, out)
        run_section(results, "summary", 10, summary, results)
    results.get("export", {}).pop("onnx_path", None)  # a temporary file, gone now
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json(results, out)
    print(f"JSON written to {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
