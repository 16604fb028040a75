from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from timm.layers import Conv2dSame

from vision_lora import LoRAConfig, apply_lora, merge_lora
from vision_lora.checkpoint import load_model
from vision_lora.deploy import export_onnx, quantize_int8, read_onnx_metadata
from vision_lora.deploy import onnx as export_module
from vision_lora.lora import LoRALayer, lora_layers

CLASS_NAMES = ["golden retriever", "crème brûlée", "日本語 ラベル", 'a/b "quoted"']


def _adapted(name: str, num_classes: int, **config) -> torch.nn.Module:
    """A random-init timm model with LoRA whose B matrices are non-zero, as after training."""
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=num_classes)
    apply_lora(model, LoRAConfig(**config))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model


def _onnx_logits(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


def _eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    mode = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(mode)
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    """test_vit with qkv LoRA (dropout on), exported from train mode with unmerged adapters."""
    model = _adapted("test_vit", 4, target_modules=["qkv"], lora_dropout=0.1)
    torch.manual_seed(2)
    x = {1: torch.randn(1, 3, 160, 160), 3: torch.randn(3, 3, 160, 160)}
    expected = {b: _eval_logits(model, xb) for b, xb in x.items()}
    model.train()
    before = _state(model)
    traced = {}
    real_trace = export_module._trace

    def spy_trace(*args):
        program = real_trace(*args)
        initializers = program.model.graph.initializers
        traced["names"] = list(initializers)
        traced["size"] = sum(math.prod(v.shape) for v in initializers.values())
        return program

    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "_trace", spy_trace)
        report = export_onnx(model, path, class_names=CLASS_NAMES)
    return {"model": model, "before": before, "x": x, "expected": expected, "path": path, "report": report, **traced}


def test_vit_export_matches_adapted_model_at_two_batch_sizes(vit_export):
    path, report = vit_export["path"], vit_export["report"]
    for b, x in vit_export["x"].items():
        got = _onnx_logits(path, x)
        assert got.shape == (b, 4)
        torch.testing.assert_close(got, vit_export["expected"][b], atol=1e-5, rtol=0)
    assert set(report.max_abs_diff) == {1, 3} and max(report.max_abs_diff.values()) < 1e-5
    assert report.top1_agreement == 1.0 and report.images_max_abs_diff is None
    assert report.precision == "float32" and report.opset == 18 and report.tolerance == 1e-4
    assert report.size_bytes == path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left behind


def test_vit_graph_has_a_symbolic_batch_axis_and_plain_float32_io(vit_export):
    graph = onnx.load(vit_export["path"]).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 160, 160]


def test_vit_graph_holds_exactly_the_base_model_weights(vit_export):
    base_params = sum(p.numel() for p in timm.create_model("test_vit", num_classes=4).parameters())
    # The traced graph (before onnxscript folds and deduplicates constants) holds one initializer per parameter.
    assert not any("lora" in n for n in vit_export["names"])
    assert vit_export["size"] == base_params == vit_export["report"].num_params
    final = onnx.load(vit_export["path"]).graph.initializer
    assert not any("lora" in i.name.lower() for i in final)
    assert sum(math.prod(i.dims) for i in final) <= base_params


def test_vit_export_leaves_callers_model_untouched(vit_export):
    model = vit_export["model"]
    assert model.training and len(lora_layers(model)) == 6
    assert all(isinstance(m, LoRALayer) and not m.merged for m in lora_layers(model).values())
    after = model.state_dict()
    assert after.keys() == vit_export["before"].keys()
    assert all(torch.equal(after[k], v) for k, v in vit_export["before"].items())


def test_metadata_round_trips_through_the_file(vit_export):
    meta = read_onnx_metadata(vit_export["path"])
    assert meta["class_names"] == CLASS_NAMES and meta["num_classes"] == 4
    assert meta["input_size"] == [3, 160, 160] and meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3
    assert meta["interpolation"] == "bicubic" and meta["crop_pct"] == pytest.approx(0.95)
    assert meta["backbone"] == "test_vit" and meta["opset"] == 18 and meta["precision"] == "float32"
    assert meta["vision_lora_version"]
    # Other runtimes see the same values through onnxruntime's own metadata reader.
    custom = ort.InferenceSession(str(vit_export["path"])).get_modelmeta().custom_metadata_map
    assert custom["num_classes"] == "4"


def test_tf_efficientnet_same_padding_with_pointwise_and_stem_lora(tmp_path):
    model = _adapted("tf_efficientnet_lite0", 3, target_modules=["preset:pointwise", "conv_stem"])
    assert isinstance(model.conv_stem.base_layer, Conv2dSame)  # the k×k same-padding conv carries LoRA too
    assert sum(m.kernel_size == (1, 1) for m in lora_layers(model).values()) > 20
    torch.manual_seed(2)
    x, images = torch.randn(4, 3, 64, 64), torch.randn(5, 3, 64, 64)
    expected = _eval_logits(model, x)
    report = export_onnx(model, tmp_path / "effnet.onnx", data_config={"input_size": (3, 64, 64)}, images=images)
    got = _onnx_logits(tmp_path / "effnet.onnx", x)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert report.images_max_abs_diff is not None and report.images_top1_agreement == 1.0
    assert report.num_params == sum(
        p.numel() for p in timm.create_model("tf_efficientnet_lite0", num_classes=3).parameters()
    )
    assert read_onnx_metadata(tmp_path / "effnet.onnx")["input_size"] == [3, 64, 64]
    assert "on the given images" in str(report) and len(str(report).splitlines()) == 3


def test_train_mode_unmerged_export_equals_merged_eval_export(tmp_path):
    # BatchNorm trains here (train_norm), so a train-mode trace would normalise with batch statistics.
    model = _adapted("test_resnet", 5, target_modules=["layer1.0.conv1"], train_norm=True)
    assert lora_layers(model)["layer1.0.conv1"].kernel_size == (3, 3)
    model.train()
    before = _state(model)
    export_onnx(model, tmp_path / "train.onnx")
    assert model.training and model.bn1.training and "layer1.0.conv1" in lora_layers(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    merged = merge_lora(_adapted("test_resnet", 5, target_modules=["layer1.0.conv1"], train_norm=True)).eval()
    export_onnx(merged, tmp_path / "merged.onnx")
    x = torch.randn(3, 3, 160, 160)
    expected = _eval_logits(model, x)
    from_train = _onnx_logits(tmp_path / "train.onnx", x)
    torch.testing.assert_close(from_train, _onnx_logits(tmp_path / "merged.onnx", x), atol=1e-6, rtol=0)
    torch.testing.assert_close(from_train, expected, atol=1e-5, rtol=0)


def _tiny_classifier() -> torch.nn.Module:
    """A classifier that traces in about a second, for checks that do not depend on the architecture."""
    layers = [torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 3))


def _export_tiny(path, **kwargs):
    return export_onnx(_tiny_classifier(), path, model_name="tiny", data_config={"input_size": (3, 32, 32)}, **kwargs)


class _BatchDependent(torch.nn.Module):
    """Runs at any batch size in PyTorch, but branches on it, so torch.export specialises the batch to a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _tiny_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.shape[0] != 2 else self.net(x) * 1.0


@pytest.mark.parametrize("cause", ["batch-dependent forward", "static trace"])
def test_fixed_batch_dimension_is_rejected(tmp_path, monkeypatch, cause):
    seen = []
    real_check = export_module.check_graph

    def spy_check(proto):
        seen.append(proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value)
        real_check(proto)

    monkeypatch.setattr(export_module, "check_graph", spy_check)
    model = _BatchDependent()
    if cause == "static trace":
        model = _tiny_classifier()
        monkeypatch.setattr(export_module, "_dynamic_shapes", lambda: None)
    with pytest.raises(ValueError, match="fixed batch dimension of 2"):
        export_onnx(model, tmp_path / "static.onnx", model_name="tiny", data_config={"input_size": (3, 32, 32)})
    assert seen == [2]  # a real file with a fixed batch reached the checker
    assert not list(tmp_path.iterdir())


def test_output_mismatch_fails_and_keeps_the_previous_file(tmp_path, monkeypatch):
    real_to_proto, real_compare, diffs = export_module._to_proto, export_module._compare, []

    def corrupt(program, metadata):
        proto = real_to_proto(program, metadata)
        for init in proto.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.05, init.name))
        return proto

    def spy_compare(session, x, reference):
        diff, same = real_compare(session, x, reference)
        diffs.append(diff)
        return diff, same

    monkeypatch.setattr(export_module, "_to_proto", corrupt)
    monkeypatch.setattr(export_module, "_compare", spy_compare)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ValueError, match="differ from PyTorch"):
        _export_tiny(path)
    assert len(diffs) == 2 and min(diffs) > 1e-3  # onnxruntime really ran on the corrupted weights
    assert path.read_bytes() == b"previous export" and list(tmp_path.iterdir()) == [path]


def test_plain_module_exports_with_an_explicit_name(tmp_path):
    report = _export_tiny(tmp_path / "tiny.onnx", batch_sizes=(1, 2, 5), opset=21)
    assert set(report.max_abs_diff) == {1, 2, 5} and max(report.max_abs_diff.values()) < 1e-5
    opsets = {o.domain: o.version for o in onnx.load(tmp_path / "tiny.onnx").opset_import}
    assert opsets[""] == 21 == report.opset
    assert report.num_params == sum(p.numel() for p in _tiny_classifier().parameters())
    meta = read_onnx_metadata(tmp_path / "tiny.onnx")
    assert meta["backbone"] == "tiny" and meta["class_names"] is None and meta["num_classes"] == 3
    assert meta["opset"] == 21


def test_fp16_export_runs_in_onnxruntime_and_agrees_on_top1(tmp_path):
    model = _adapted("test_resnet", 4, target_modules=["layer1.0.conv1"])
    with torch.no_grad():
        model.fc.weight.normal_(std=1.0)  # spread the logits like a trained head
    torch.manual_seed(2)
    x = torch.randn(8, 3, 160, 160)
    expected = _eval_logits(model, x)
    report = export_onnx(model, tmp_path / "fp16.onnx", fp16=True)
    proto = onnx.load(tmp_path / "fp16.onnx")
    floats = {i.data_type for i in proto.graph.initializer} - {onnx.TensorProto.INT64}
    assert floats == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    got = _onnx_logits(tmp_path / "fp16.onnx", x)
    assert got.dtype == torch.float32
    assert (got.argmax(1) == expected.argmax(1)).all() and report.top1_agreement == 1.0
    err = (got - expected).abs().max().item()
    assert 1e-6 < err < 1e-2 * max(1.0, expected.abs().max().item())  # really float16, and close
    assert report.precision == "float16" and read_onnx_metadata(tmp_path / "fp16.onnx")["precision"] == "float16"
    assert report.size_bytes < 0.6 * 4 * report.num_params


def test_bad_arguments_are_rejected_before_export(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match="opset must be >= 18"):
        export_onnx(model, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ValueError, match="other than 2"):
        export_onnx(model, tmp_path / "m.onnx", batch_sizes=(2,))
    with pytest.raises(ValueError, match="2 class names given for a model with 3 outputs"):
        export_onnx(model, tmp_path / "m.onnx", class_names=["a", "b"])
    with pytest.raises(ValueError, match="images must be a preprocessed batch"):
        export_onnx(model, tmp_path / "m.onnx", images=torch.randn(2, 3, 32, 32))
    assert not list(tmp_path.iterdir())


def test_read_metadata_rejects_foreign_files(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save_model(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="no vision_lora metadata"):
        read_onnx_metadata(tmp_path / "other.onnx")
    with pytest.raises(FileNotFoundError):
        read_onnx_metadata(tmp_path / "missing.onnx")


def test_report_prints_a_short_summary(vit_export):
    text = str(vit_export["report"])
    assert len(text.splitlines()) == 2 and "batch 1" in text and "batch 3" in text and "100.0%" in text
    assert np.isfinite(vit_export["report"].export_seconds) and vit_export["report"].export_seconds > 0


def test_int8_quantization_writes_only_when_agreement_reaches_the_minimum(tmp_path):
    fp32, int8 = tmp_path / "m.fp32.onnx", tmp_path / "m.onnx"
    _export_tiny(fp32)
    generator = torch.Generator().manual_seed(0)
    calibration, evaluation = torch.randn(8, 3, 32, 32, generator=generator), torch.randn(12, 3, 32, 32)
    labels = _onnx_logits(fp32, evaluation).argmax(1)
    report = quantize_int8(fp32, int8, calibration, evaluation, labels, min_agreement=0.0)
    assert report.written and report.fp32_accuracy == 1.0 and 0 <= report.agreement <= 1
    assert report.int8_accuracy == report.agreement and "top-1 agreement" in str(report)
    meta = read_onnx_metadata(int8)
    assert meta["precision"] == "int8" and meta["input_size"] == [3, 32, 32] and meta["backbone"] == "tiny"
    settings = meta["quantization"]
    assert settings["format"] == "QDQ" and settings["calibration_images"] == 8 and len(settings["float_nodes"]) == 1
    ops = {n.op_type for n in onnx.load(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the Gemm of the head is int8; the stem conv stays float
    assert _onnx_logits(int8, evaluation).shape == (12, 3)

    int8.write_bytes(b"previous export")
    refused = quantize_int8(fp32, int8, calibration, evaluation, min_agreement=1.01)
    assert not refused.written and refused.fp32_accuracy is None
    assert int8.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.fp32.onnx",
        "m.onnx",
    ]
    _export_tiny(tmp_path / "m16.onnx", fp16=True)
    with pytest.raises(ValueError, match="int8 quantization starts from a float32 export"):
        quantize_int8(tmp_path / "m16.onnx", int8, calibration, evaluation)


def test_load_model_needs_exactly_one_existing_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --ckpt_path or --adapter"):
        load_model()
    with pytest.raises(ValueError, match="exactly one of --ckpt_path or --adapter"):
        load_model(ckpt_path="a.ckpt", adapter="dir")
    with pytest.raises(FileNotFoundError):
        load_model(ckpt_path=tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint written by vision-lora fit"):
        load_model(ckpt_path=tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_model(adapter=tmp_path)


def test_int8_images_skip_an_unreadable_file_and_keep_labels_aligned(image_folder, capsys):
    from vision_lora.checkpoint import TrainedModel
    from vision_lora.data.folder import labelled_images, preprocess_files
    from vision_lora.deploy.int8 import run_images

    (image_folder / "train" / "green" / "zz_broken.png").write_bytes(b"\x89PNG truncated")
    (image_folder / "test" / "green" / "0.png").write_bytes(b"")  # an empty file among the labelled ones
    classes = sorted(p.name for p in (image_folder / "train").iterdir())
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    trained = TrainedModel(timm.create_model("test_resnet", num_classes=3), "test_resnet", classes, config)
    calibration, evaluation, labels, _ = run_images(trained, data_root=image_folder, calib_images=100)
    err = capsys.readouterr().err
    assert "zz_broken.png\tskipped" in err and f"{image_folder / 'test' / 'green' / '0.png'}\tskipped" in err
    assert len(calibration) == 3 * 12
    paths, targets = labelled_images(image_folder / "test", classes)
    kept = [i for i, p in enumerate(paths) if not p.endswith("green/0.png")]
    torch.testing.assert_close(evaluation, preprocess_files([paths[i] for i in kept], config))
    assert labels.tolist() == [targets[i] for i in kept]
