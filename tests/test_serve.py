"""`vision-lora serve` against real server processes on free local ports, and int8 export through the CLI."""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import make_image_folder
from helpers import FAST
from PIL import Image

from vision_lora.cli import main
from vision_lora.data.decode import ImageTooLargeError, decode_image
from vision_lora.deploy import read_onnx_metadata
from vision_lora.preprocess import eval_stages, eval_transform

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF"}


# -- a trained run, its ONNX export and `vision-lora predict`'s answers ---------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch test_resnet run on three colour classes, exported to ONNX, and the test images in every format
    (plus an EXIF-rotated JPEG) with the labels `vision-lora predict` gives them."""
    import torch

    work = tmp_path_factory.mktemp("serve_run")
    data = make_image_folder(work / "data", {"train": 12, "val": 4, "test": 4})
    torch.manual_seed(123)
    import timm

    weights = work / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    formats = work / "formats"
    formats.mkdir()
    for i, path in enumerate(sorted((data / "test").rglob("*.png"))):
        image = Image.open(path).convert("RGB")
        ext = list(FORMATS)[i % len(FORMATS)]
        image.save(formats / f"{i:02d}.{ext}", FORMATS[ext])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated = Image.open(next((data / "test").rglob("*.png"))).convert("RGB").crop((0, 0, 32, 20))
    rotated.save(formats / "exif_rotated.jpeg", "JPEG", exif=exif)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        main(["fit", *FAST, f"--model.weights={weights}", f"--data.root={data}", "--trainer.max_epochs=2"])
        best = next((work / "runs/lightning_logs/version_0/checkpoints").glob("best-*.ckpt"))
        main(["export", "--ckpt_path", str(best), "--output", "model.onnx"])
        args = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
        main(["predict", "--ckpt_path", str(best), f"--data.predict_dir={formats}", *args])
    with open(work / "runs/lightning_logs/version_0/predict/predictions.csv", newline="", encoding="utf-8") as f:
        predicted = {Path(row["path"]).name: row["prediction"] for row in csv.DictReader(f)}
    assert len(predicted) == len(list(formats.iterdir()))
    return {
        "work": work,
        "data": data,
        "best": best,
        "onnx": work / "model.onnx",
        "formats": formats,
        "predicted": predicted,
    }


# -- a server process -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vision-lora serve` in its own process group; `stop()` sends SIGTERM, then kills whatever is left."""

    def __init__(self, *args: str, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "vision_lora.cli", "serve", *args, "--port", str(self.port)]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/health")[0] == 200:
                    return
            time.sleep(0.3)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), data
        finally:
            conn.close()

    def predict(self, body: bytes, content_type: str) -> tuple[int, dict, dict]:
        status, headers, data = self.request("POST", "/predict", body, {"Content-Type": content_type})
        return status, {k.lower(): v for k, v in headers.items()}, json.loads(data)

    def tree(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(self.process.pid)
            return [parent, *parent.children(recursive=True)]
        return []

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group after 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@contextlib.contextmanager
def serving(*args: str, log: Path):
    server = Server(*args, log=log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(run):
    with serving(
        "--model",
        str(run["onnx"]),
        "--max_batch_size",
        "8",
        "--batch_timeout_ms",
        "200",
        "--top_k",
        "2",
        "--max_body_mb",
        "1",
        log=run["work"] / "server.log",
    ) as s:
        yield s


def multipart(data: bytes, field: str = "image", filename: str = "x") -> tuple[bytes, str]:
    boundary = "vision-lora-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@functools.cache
def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit PNG of width × height black pixels: a few hundred kB that decode to 900 MB of RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(6), b"\x00" * (1 + (width + 7) // 8)
    rows = b"".join([row] * 1000)
    idat = b"".join(compressor.compress(rows) for _ in range(height // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- tests ------------------------------------------------------------------------------------------------------------


def test_each_format_gets_the_label_vision_lora_predict_gives(run, server):
    files = sorted(run["formats"].iterdir())
    assert {p.suffix for p in files} == {f".{e}" for e in FORMATS}
    for path in files:
        status, headers, answer = server.predict(*multipart(path.read_bytes(), filename=path.name))
        assert status == 200, answer
        predictions = answer["predictions"]
        assert predictions[0]["label"] == run["predicted"][path.name], path.name
        assert len(predictions) == 2 and predictions[0]["score"] >= predictions[1]["score"]
        assert sum(p["score"] for p in predictions) <= 1 + 1e-9
        assert headers["x-batch-size"] == "1"
    # The same image as JSON base64 gets the same answer.
    path = files[0]
    body = json.dumps({"image": base64.b64encode(path.read_bytes()).decode()}).encode()
    status, _, answer = server.predict(body, "application/json")
    assert status == 200 and answer["predictions"][0]["label"] == run["predicted"][path.name]


def test_bad_requests_get_a_4xx_and_the_server_keeps_answering(run, server):
    good = (run["formats"] / "00.jpeg").read_bytes()
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    bomb = png_bomb()
    assert len(bomb) < 1_000_000  # under --max_body_mb 1: refused for its pixels, not its size
    cases = {
        "not an image": (*multipart(b"this is text, not pixels"), 400),
        "empty multipart file": (*multipart(b""), 400),
        "empty body": (b"", "application/json", 400),
        "truncated JPEG": (*multipart(jpeg.getvalue()[:5000]), 400),
        "JSON without image": (b'{"picture": "abc"}', "application/json", 400),
        "JSON that is not JSON": (b"{not json", "application/json", 400),
        "bad base64": (b'{"image": "***"}', "application/json", 400),
        "multipart without image field": (*multipart(good, field="photo"), 400),
        "30000 x 30000 PNG": (*multipart(bomb), 413),
        "body over --max_body_mb": (*multipart(b"\0" * 1_500_000), 413),
    }
    for name, (body, content_type, expected) in cases.items():
        start = time.perf_counter()
        status, _, answer = server.predict(body, content_type)
        assert status == expected and isinstance(answer["detail"], str), (name, status, answer)
        if name == "30000 x 30000 PNG":
            assert time.perf_counter() - start < 1.0 and "too large" in answer["detail"]
        status, _, answer = server.predict(*multipart(good))
        assert status == 200, name
    assert server.request("GET", "/predict")[0] == 405
    assert server.request("POST", "/nope", b"x")[0] == 404


def test_concurrent_requests_are_batched(run, server):
    files = sorted(run["formats"].iterdir())[:12]
    answers = {}

    def send(path: Path) -> None:
        answers[path.name] = server.predict(*multipart(path.read_bytes()))

    threads = [threading.Thread(target=send, args=(p,)) for p in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == len(files)
    sizes = [int(headers["x-batch-size"]) for _, headers, _ in answers.values()]
    assert max(sizes) > 1 and max(sizes) <= 8  # at most --max_batch_size together
    for name, (status, _, answer) in answers.items():
        assert status == 200 and answer["predictions"][0]["label"] == run["predicted"][name]


def test_health_and_info_describe_the_model(run, server):
    assert server.request("GET", "/health")[:1] == (200,)
    status, _, data = server.request("GET", "/info")
    model = json.loads(data)["model"]
    assert status == 200 and model["name"] == "test_resnet" and model["input_size"] == [3, 32, 32]
    assert model["classes"] == ["blue ünïcode", "green", "red square"] and model["version"]
    assert model["precision"] == "float32" and model["max_batch_size"] == 8 and model["top_k"] == 2


def test_an_onnx_file_without_vision_lora_metadata_fails_at_startup(tmp_path, capsys):
    import onnx

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["input"], ["logits"])],
        "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3])],
    )
    onnx.save_model(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(tmp_path / "other.onnx"), "--port", str(_free_port())])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and time.perf_counter() - start < 10
    assert len(err.splitlines()) == 1 and "no vision_lora metadata" in err and "vision-lora export" in err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tmp_path / "missing.onnx")])
    assert "not found" in capsys.readouterr().err
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tmp_path / "text.onnx")])
    assert "is not an ONNX file" in capsys.readouterr().err


def test_sigterm_stops_the_server_and_its_workers(server):
    # The last test of the module's server: it stops it.
    tree = server.tree()
    assert len(tree) >= 3  # the parent, LitServe's HTTP and inference workers
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_decode_image_checks_the_header_before_decoding():
    png = io.BytesIO()
    Image.new("RGB", (300, 200)).save(png, "PNG")
    with pytest.raises(ImageTooLargeError, match="300x200"):
        decode_image(png.getvalue(), max_pixels=50_000)
    assert decode_image(png.getvalue(), max_pixels=60_000).size == (300, 200)
    bomb = png_bomb()
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize(
    "config",
    [
        {"input_size": (3, 96, 96), "interpolation": "bilinear", "crop_pct": 1.0},
        {"input_size": (3, 64, 48), "interpolation": "bicubic", "crop_pct": 0.875},
    ],
)
def test_the_two_serving_stages_equal_eval_transform_bit_for_bit(config):
    """The HTTP process resizes and crops to uint8, the worker normalises the batch: the same pixels as export
    verification and `vision-lora test` see."""
    config = {**config, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    rng = np.random.default_rng(0)
    sizes = ((8, 8), (300, 120), (97, 413))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pixels, normalize = eval_stages(config)
    batch = normalize(np.stack([pixels(image) for image in images]))  # (3, 3, H, W)
    expected = torch.stack([eval_transform(config)(image) for image in images])
    torch.testing.assert_close(torch.from_numpy(batch), expected, rtol=0, atol=0)


def test_int8_export_reports_agreement_and_refuses_below_the_minimum(run, capsys, caplog):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run["work"])
        main(
            [
                "export",
                "--ckpt_path",
                str(run["best"]),
                "--output",
                "int8.onnx",
                "--quantize",
                "int8",
                "--min_agreement",
                "0",
            ]
        )
        meta = read_onnx_metadata("int8.onnx")
        assert meta["precision"] == "int8" and meta["quantization"]["format"] == "QDQ"
        assert meta["class_names"] == ["blue ünïcode", "green", "red square"]
        assert read_onnx_metadata("int8.fp32.onnx")["precision"] == "float32"
        text = caplog.text
        assert "top-1 agreement" in text and "accuracy fp32" in text and str(run["data"] / "test") in text

        Path("kept.onnx").write_bytes(b"previous export")
        with pytest.raises(SystemExit):
            main(
                [
                    "export",
                    "--ckpt_path",
                    str(run["best"]),
                    "--output",
                    "kept.onnx",
                    "--quantize",
                    "int8",
                    "--min_agreement",
                    "1.01",
                ]
            )
        err = capsys.readouterr().err
        assert "under --min_agreement" in err and "kept.onnx was not written" in err
        assert Path("kept.onnx").read_bytes() == b"previous export"
        assert read_onnx_metadata("kept.fp32.onnx")["precision"] == "float32"
        assert not list(Path(".").glob(".kept.onnx*"))  # no temporary file left


# -- slow: serving int8, checkpoints and adapters; 1,000 bad requests -----------------------------------------------


@pytest.mark.slow
def test_int8_checkpoint_and_adapter_sources_serve_the_same_labels(run):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run["work"])
        if not Path("int8.onnx").exists():
            main(
                [
                    "export",
                    "--ckpt_path",
                    str(run["best"]),
                    "--output",
                    "int8.onnx",
                    "--quantize",
                    "int8",
                    "--min_agreement",
                    "0",
                ]
            )
    adapter = run["best"].parent.parent / "adapter"
    files = sorted(run["formats"].iterdir())
    for source in (
        ["--model", str(run["work"] / "int8.onnx")],
        ["--ckpt_path", str(run["best"])],
        ["--adapter", str(adapter)],
    ):
        with serving(*source, log=run["work"] / "source.log") as server:
            info = json.loads(server.request("GET", "/info")[2])["model"]
            labels = {p.name: server.predict(*multipart(p.read_bytes()))[2]["predictions"][0]["label"] for p in files}
        if source[0] == "--model":
            assert info["precision"] == "int8" and info["quantization"]["format"] == "QDQ"
            agree = np.mean([labels[n] == run["predicted"][n] for n in labels])
            assert agree >= 0.8, agree  # int8 may flip a borderline image of this tiny random-ish model
        else:
            assert labels == run["predicted"], source


@pytest.mark.slow
def test_a_thousand_bad_requests_leave_memory_flat_and_answers_right(run):
    good = run["formats"] / "00.jpeg"
    jpeg = good.read_bytes()
    bad = [
        multipart(b"not an image"),
        multipart(jpeg[: len(jpeg) // 2]),
        (b"", "application/json"),
        (b'{"image": "%%%"}', "application/json"),
        multipart(png_bomb()),
        multipart(b"\0" * 1_200_000),
    ]
    with serving("--model", str(run["onnx"]), "--max_body_mb", "1", log=run["work"] / "memory.log") as server:
        for _ in range(50):  # warm up allocators and caches
            server.predict(*multipart(jpeg))
            server.predict(*bad[0])

        def rss() -> int:
            return sum(p.memory_info().rss for p in server.tree())

        before = rss()
        deadline = time.monotonic() + 240
        for i in range(1000):
            assert time.monotonic() < deadline
            status, _, _ = server.predict(*bad[i % len(bad)])
            assert 400 <= status < 500
        after = rss()
        status, _, answer = server.predict(*multipart(jpeg))
    assert status == 200 and answer["predictions"][0]["label"] == run["predicted"][good.name]
    assert after <= 1.10 * before, (before, after)
