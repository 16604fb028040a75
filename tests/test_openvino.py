"""`export --format openvino`: parity with PyTorch, metadata, NNCF int8 behind the agreement gate, serving an IR, and
OpenVINO's telemetry kept off (no `~/intel`)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from test_serve import multipart, serving
from test_serve import run as trained_run  # noqa: F401  the fixture `run`: a trained test_resnet run

from vision_lora import LoRAConfig, apply_lora
from vision_lora.cli import main
from vision_lora.deploy import read_onnx_metadata
from vision_lora.deploy.int8 import check_agreement
from vision_lora.errors import VisionLoRAError
from vision_lora.lora import lora_layers

pytest.importorskip("openvino")
pytest.importorskip("nncf")
from vision_lora.deploy.openvino import (  # noqa: E402
    compile_openvino,
    export_openvino,
    quantize_openvino_int8,
    read_openvino_metadata,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "crème brûlée", "日本語"]


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    """test_resnet with non-zero LoRA, exported once to an IR (and its ONNX file kept beside it)."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=3)
    apply_lora(model, LoRAConfig())
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    model.eval()
    work = tmp_path_factory.mktemp("openvino")
    report = export_openvino(model, work / "model.xml", class_names=CLASSES, onnx_output=work / "model.onnx")
    return {"model": model, "work": work, "report": report, "path": work / "model.xml"}


def test_openvino_ir_matches_pytorch_in_f32_and_keeps_the_metadata(ir):
    path, report = ir["path"], ir["report"]
    assert path.is_file() and path.with_suffix(".bin").is_file()
    assert set(report.max_abs_diff) == {1, 3}
    assert max(report.max_abs_diff.values()) <= 1e-4 * max(1.0, report.max_abs_logit)
    x = torch.randn(4, 3, 160, 160)
    with torch.no_grad():
        expected = ir["model"](x).numpy()
    got = compile_openvino(path, "f32")(x.numpy())[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    meta, onnx_meta = read_openvino_metadata(path), read_onnx_metadata(ir["work"] / "model.onnx")
    assert meta["class_names"] == CLASSES and meta["runtime"] == "openvino" and meta["precision"] == "float32"
    assert {k: v for k, v in meta.items() if k != "runtime"} == onnx_meta
    assert "OpenVINO (f32 inference precision) vs PyTorch" in str(report)


def test_int8_is_written_above_the_minimum_and_refused_under_it(ir):
    work = ir["work"]
    images = torch.randn(24, 3, 160, 160)
    report = quantize_openvino_int8(ir["path"], work / "int8.xml", images, images, min_agreement=0.0)
    assert report.written and (work / "int8.xml").is_file() and report.size_bytes < report.fp32_size_bytes
    meta = read_openvino_metadata(work / "int8.xml")
    assert meta["precision"] == "int8" and meta["quantization"]["tool"] == "nncf.quantize"
    before = (work / "int8.xml").read_bytes()
    refused = quantize_openvino_int8(ir["path"], work / "int8.xml", images, images, min_agreement=1.01)
    assert not refused.written and (work / "int8.xml").read_bytes() == before
    with pytest.raises(VisionLoRAError, match="under --min_agreement"):
        check_agreement(refused, ir["path"])
    with pytest.raises(VisionLoRAError, match="float32"):
        quantize_openvino_int8(work / "int8.xml", work / "again.xml", images, images)


def test_a_multilabel_ir_keeps_its_thresholds_and_int8_is_judged_on_exact_label_sets(ir, tmp_path):
    thresholds = [0.5, 0.3, 0.7]
    path = tmp_path / "tags.xml"
    export_openvino(ir["model"], path, class_names=CLASSES, thresholds=thresholds)
    meta = read_openvino_metadata(path)
    assert meta["task"] == "multilabel" and meta["thresholds"] == pytest.approx(thresholds)
    images = torch.randn(24, 3, 160, 160)
    report = quantize_openvino_int8(path, tmp_path / "tags.int8.xml", images, images, min_agreement=0.0)
    assert report.written and report.measure == "exact label-set" and "exact label-set agreement" in str(report)
    assert read_openvino_metadata(tmp_path / "tags.int8.xml")["thresholds"] == pytest.approx(thresholds)
    cuts = np.log(np.array(thresholds) / (1 - np.array(thresholds)))  # sigmoid(z) >= t  <=>  z >= logit(t)
    sets = [compile_openvino(p, "f32")(images.numpy())[0] >= cuts for p in (path, tmp_path / "tags.int8.xml")]
    assert report.agreement == pytest.approx(float((sets[0] == sets[1]).all(1).mean()))


def test_a_non_xml_output_and_a_foreign_ir_are_refused(ir, tmp_path):
    with pytest.raises(VisionLoRAError, match=r"\.xml"):
        export_openvino(ir["model"], tmp_path / "model.onnx")
    import openvino as ov

    foreign = tmp_path / "foreign.xml"
    ov.save_model(ov.Core().read_model(str(ir["work"] / "model.onnx")), str(foreign))
    with pytest.raises(VisionLoRAError, match="no vision_lora metadata"):
        read_openvino_metadata(foreign)


_CONVERT = """
import sys
import onnx
from onnx import TensorProto, helper
if {opt_out}:
    from vision_lora.deploy.openvino import openvino_module
    ov = openvino_module()
else:
    import openvino as ov
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), sys.argv[1])
ov.convert_model(sys.argv[1])
import nncf  # noqa: F401  NNCF starts its telemetry on import
"""


def _convert_under(home: Path, opt_out: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV")}
    env |= {"HOME": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}
    script = textwrap.dedent(_CONVERT.format(opt_out=opt_out))
    subprocess.run(
        [sys.executable, "-c", script, str(home / "m.onnx")], env=env, check=True, timeout=120, capture_output=True
    )


def test_openvino_telemetry_writes_nothing_under_home(tmp_path):
    _convert_under(tmp_path, opt_out=True)
    assert not (tmp_path / "intel").exists()


@pytest.mark.slow
def test_without_the_opt_out_openvino_writes_under_home(tmp_path):
    """The same conversion without `openvino_module` writes ~/intel: the test above is not vacuous."""
    _convert_under(tmp_path, opt_out=False)
    assert (tmp_path / "intel").exists()


@pytest.mark.slow
def test_serving_the_ir_answers_like_serving_the_onnx_file(ir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
        bodies.append(multipart(buffer.getvalue()))
    answers = {}
    for name in ("model.onnx", "model.xml"):
        with serving("--model", str(ir["work"] / name), "--top_k", "3", log=tmp_path / f"{name}.log") as server:
            status, _, info = server.request("GET", "/info")
            assert status == 200
            answers[name] = [server.predict(*body)[2]["predictions"] for body in bodies]
    for onnx_answer, ir_answer in zip(answers["model.onnx"], answers["model.xml"], strict=True):
        assert [p["label"] for p in onnx_answer] == [p["label"] for p in ir_answer]
        assert np.allclose([p["score"] for p in onnx_answer], [p["score"] for p in ir_answer], atol=1e-5)


@pytest.mark.slow
def test_export_openvino_int8_through_the_cli_and_its_gate(request, capsys):
    run = request.getfixturevalue("trained_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run["work"])
        best = str(run["best"])
        main(["export", "--ckpt_path", best, "--format", "openvino", "--output", "ov.xml", "--quantize", "int8"])
        assert read_openvino_metadata("ov.xml")["precision"] == "int8"
        assert read_openvino_metadata("ov.fp32.xml")["precision"] == "float32"
        Path("kept.xml").write_bytes(b"previous export")
        with pytest.raises(SystemExit):
            args = ["--output", "kept.xml", "--quantize", "int8", "--min_agreement", "1.01"]
            main(["export", "--ckpt_path", best, "--format", "openvino", *args])
        err = capsys.readouterr().err
        assert "under --min_agreement" in err and "kept.xml was not written" in err
        assert Path("kept.xml").read_bytes() == b"previous export" and not Path("kept.bin").exists()
        assert not [p for p in Path(".").iterdir() if p.name.startswith(".kept")]  # no staging folder left
