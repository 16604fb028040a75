"""Does quantization-aware fine-tuning bring an int8 file closer to float32? For one (merged) checkpoint: fold each
batch norm into its conv, simulate the export's int8 in PyTorch (per-output-channel int8 weights, uint8 per-tensor
activations with min-max ranges from 256 train images, at the inputs and outputs of the convs and the linear layer the
export quantizes), fine-tune every weight for `--epochs` on the train split to reproduce the float32 model's logits
(MSE; the teacher is the checkpoint itself), then export and quantize the student as `export --quantize int8` does
and compare its decisions with the original float32 model's on the val split and the evaluation images.

    python benchmarks/int8_qat.py --ckpt_path BEST.ckpt --out benchmarks/results/int8_qat.json

Agreement is measured as the export gate measures it (top-1; multi-label: exact label sets at the checkpoint's
thresholds), on the run's test split (else val).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from int8_sensitivity import onnx_logits, result_header  # noqa: E402

from vision_lora.checkpoint import load_model  # noqa: E402
from vision_lora.deploy.int8 import INT8_OP_TYPES, _float_nodes, agree, decisions, run_images, static_qdq  # noqa: E402
from vision_lora.deploy.onnx import export_onnx  # noqa: E402
from vision_lora.lora.inject import merge_lora  # noqa: E402


class FakeQuant(nn.Module):
    """uint8 per-tensor asymmetric rounding (as onnxruntime's QDQ) with a straight-through gradient; records its
    min-max range while `calibrating`."""

    def __init__(self) -> None:
        super().__init__()
        self.low, self.high, self.calibrating = None, None, True

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            low, high = x.detach().min(), x.detach().max()
            self.low = low if self.low is None else torch.minimum(self.low, low)
            self.high = high if self.high is None else torch.maximum(self.high, high)
            return x
        low, high = self.low.clamp(max=0), self.high.clamp(min=0)
        scale = (high - low).clamp(min=1e-12) / 255
        zero = torch.round(-low / scale)
        rounded = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
        return x + (rounded - x).detach()


def int8_weight(w: Tensor) -> Tensor:
    """Per-output-channel symmetric int8 rounding of a weight, straight-through."""
    scale = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12).view(-1, *([1] * (w.ndim - 1))) / 127
    return w + (torch.clamp(torch.round(w / scale), -127, 127) * scale - w).detach()


class QuantConv(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv, self.inputs = conv, FakeQuant()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv._conv_forward(self.inputs(x), int8_weight(self.conv.weight), self.conv.bias)


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear, self.inputs, self.outputs = linear, FakeQuant(), FakeQuant()

    def forward(self, x: Tensor) -> Tensor:
        return self.outputs(F.linear(self.inputs(x), int8_weight(self.linear.weight), self.linear.bias))


def simulate(model: nn.Module) -> nn.Module:
    """A copy of `model` with each conv + following batch-norm child folded, and the export's int8 simulated: every
    ungrouped conv but the first (the stem stays float, as the export keeps it) rounds its inputs, weights and its
    output after the norm's activation; the linear classifier rounds inputs, weights and outputs."""
    student = copy.deepcopy(model).eval()
    first = True
    for parent in list(student.modules()):
        names = list(dict(parent.named_children()))
        for i, name in enumerate(names):
            conv = getattr(parent, name)
            if not isinstance(conv, nn.Conv2d):
                continue
            norm_name = next((n for n in names[i + 1 :] if isinstance(getattr(parent, n), nn.BatchNorm2d)), None)
            if norm_name is None:
                continue
            norm = getattr(parent, norm_name)
            fused = fuse_conv_bn_eval(conv, norm)
            act = nn.Sequential(getattr(norm, "drop", nn.Identity()), getattr(norm, "act", nn.Identity()))
            if not first and fused.groups == 1:
                setattr(parent, name, QuantConv(fused))
                act.append(FakeQuant())
            else:
                setattr(parent, name, fused)
            setattr(parent, norm_name, act)
            first = False
    head = student.get_classifier()
    for parent in list(student.modules()):
        for name, child in list(parent.named_children()):
            if child is head and isinstance(child, nn.Linear):
                setattr(parent, name, QuantLinear(child))
    return student.requires_grad_(True)


def plain(student: nn.Module) -> nn.Module:
    """The float model inside a `simulate` copy (fake quantizers removed)."""
    for parent in list(student.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantConv):
                setattr(parent, name, child.conv)
            elif isinstance(child, QuantLinear):
                setattr(parent, name, child.linear)
            elif isinstance(child, FakeQuant):
                setattr(parent, name, nn.Identity())
    return student.eval().requires_grad_(False)


def _batched(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + 128]) for i in range(0, len(images), 128)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8_qat.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    trained = load_model(ckpt_path=args.ckpt_path)
    thresholds = trained.thresholds if trained.task == "multilabel" else None
    calibration, evaluation, _, eval_name = run_images(trained, calib_images=256)
    train = run_images(trained, calib_split="train", calib_images=100_000)[0]
    val = run_images(trained, calib_split="val", calib_images=100_000)[0]
    teacher = merge_lora(copy.deepcopy(trained.model)).eval().requires_grad_(False)
    targets = {"train": _batched(teacher, train), "val": _batched(teacher, val), "test": _batched(teacher, evaluation)}
    reference = {k: decisions(v.numpy(), thresholds) for k, v in targets.items()}

    def agreement(logits: Tensor | np.ndarray, split: str) -> float:
        logits = logits.numpy() if isinstance(logits, Tensor) else logits
        return round(float(agree(decisions(logits, thresholds), reference[split]).mean()), 4)

    student = simulate(teacher)
    _batched(student, calibration)
    for module in student.modules():
        if isinstance(module, FakeQuant):
            module.calibrating = False
    curve = [{"epoch": 0, "simulated_val": agreement(_batched(student, val), "val")}]
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train))
        for i in range(0, len(train), 32):
            chosen = order[i : i + 32]
            loss = F.mse_loss(student(train[chosen]), targets["train"][chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curve.append({"epoch": epoch, "simulated_val": agreement(_batched(student, val), "val")})
        print(curve[-1], flush=True)
    seconds = time.perf_counter() - start
    settings = dict(class_names=trained.class_names, data_config=trained.data_config, thresholds=thresholds)
    result = {
        **result_header("int8_qat.py", trained, thresholds, evaluation, eval_name),
        "fine_tune": {
            "epochs": args.epochs,
            "lr": args.lr,
            "loss": "MSE to the float32 logits",
            "train_images": len(train),
            "seconds": round(seconds, 1),
        },
        "simulated_curve": curve,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("float32 checkpoint", teacher), ("fine-tuned", plain(student))):
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            export_onnx(model, fp32, **settings)
            static_qdq(fp32, int8, calibration, _float_nodes(onnx.load(str(fp32)), INT8_OP_TYPES))
            result[f"int8 of the {name}"] = {
                "agreement_val": agreement(onnx_logits(int8, val), "val"),
                "agreement": agreement(onnx_logits(int8, evaluation), "test"),
                "its float32 agreement": agreement(onnx_logits(fp32, evaluation), "test"),
            }
            print(name, result[f"int8 of the {name}"], flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
