"""`vision-lora serve`: an HTTP classifier on LitServe, with dynamic batching, for ONNX exports or trained checkpoints.

A request travels in two steps. The HTTP process (`RequestGate`, an ASGI middleware in front of LitServe's route)
reads the body within its size limit, takes the image out of the multipart form or JSON, decodes it (pixel limit from
the header first) and resizes and crops it (the first of `eval_stages`): every bad request is answered there with a
4xx JSON error and never reaches a batch, because in LitServe one failing request fails the whole batch. The inference
worker (`ClassifierAPI`) then only sees uint8 pixels of the network's input size: it stacks up to `max_batch_size` of
them, normalises the batch (the second stage; together the two equal `eval_transform` bit for bit), runs onnxruntime
(or the merged PyTorch model) once, and answers each with its top-k classes and the batch size (`X-Batch-Size`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import litserve as ls
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..data.decode import DEFAULT_MAX_PIXELS, ImageTooLargeError, decode_image
from ..errors import VisionLoRAError
from ..multilabel import label_sets
from ..preprocess import DATA_CONFIG_KEYS, data_config_record, eval_stages
from .batching import batched_loop
from .onnx import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata

__all__ = ["ClassifierAPI", "RequestGate", "ServedModel", "describe_model", "multilabel_answer", "serve"]

API_PATH = "/predict"
BATCH_HEADER = "X-Batch-Size"
_PIXELS = "pixels"  # the field the gate hands the worker (base64 of uint8 (H, W, 3)); clients send "image"


@dataclass
class ServedModel:
    """What is served: one source (an ONNX export, a checkpoint or an adapter) and what its metadata says.

    Attributes:
        onnx: an .onnx file written by `vision-lora export`, served with onnxruntime.
        openvino: an OpenVINO IR (.xml) written by `vision-lora export --format openvino`, served with OpenVINO.
        ckpt_path: a checkpoint of `vision-lora fit`, merged in memory and served with PyTorch.
        adapter: an adapter directory of `vision-lora fit`, likewise.
        info: name, classes, preprocessing and provenance, as `GET /info` shows them under "model".
    """

    onnx: str | None = None
    openvino: str | None = None
    ckpt_path: str | None = None
    adapter: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def data_config(self) -> dict:
        return {k: self.info[k] for k in DATA_CONFIG_KEYS}


def describe_model(model: str | None = None, ckpt_path: str | None = None, adapter: str | None = None) -> ServedModel:
    """Check the model source in this process, before any worker starts, and read what serving needs from it.

    Raises:
        VisionLoRAError: not exactly one source, an ONNX file without vision_lora metadata, or an unloadable checkpoint.
        FileNotFoundError: the source does not exist.
    """
    from .. import __version__

    if sum(s is not None for s in (model, ckpt_path, adapter)) != 1:
        raise VisionLoRAError(
            "serve needs exactly one of --model (an exported .onnx or OpenVINO .xml), --ckpt_path or --adapter."
        )
    if model is not None and Path(model).suffix == ".xml":
        from .openvino import read_openvino_metadata

        meta = read_openvino_metadata(model)
        source = ServedModel(openvino=str(Path(model).resolve()))
        precision = f"{meta.get('precision', 'float32')} (OpenVINO)"
        name, classes, version = meta["backbone"], meta.get("class_names"), meta["vision_lora_version"]
        num_classes = meta["num_classes"]
        config = meta
        task, thresholds = meta.get("task", "multiclass"), meta.get("thresholds")
    elif model is not None:
        try:
            meta = read_onnx_metadata(model)
        except ValueError as err:
            raise VisionLoRAError(
                f"{err} serve needs an ONNX file written by `vision-lora export` (it holds the classes and the "
                f"preprocessing); export the model with it."
            ) from None
        import onnx

        graph = onnx.load(model, load_external_data=False).graph
        if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
            raise VisionLoRAError(f"{model} does not have the single input / output of a vision-lora export.")
        source = ServedModel(onnx=str(Path(model).resolve()))
        precision = meta.get("precision", "float32")
        name, classes, version = meta["backbone"], meta.get("class_names"), meta["vision_lora_version"]
        num_classes = meta["num_classes"]
        config = meta
        task, thresholds = meta.get("task", "multiclass"), meta.get("thresholds")
    else:
        from ..checkpoint import load_model

        trained = load_model(ckpt_path=ckpt_path, adapter=adapter)
        path = str(Path(ckpt_path or adapter).resolve())
        source = ServedModel(ckpt_path=path) if ckpt_path else ServedModel(adapter=path)
        precision, name, classes, version = "float32 (PyTorch)", trained.name, trained.class_names, __version__
        num_classes = int(getattr(trained.model, "num_classes", 0)) or len(classes or [])
        config = trained.data_config
        task, thresholds = trained.task, trained.thresholds
    source.info = {
        "name": name,
        "classes": list(classes) if classes else [str(i) for i in range(num_classes)],
        "num_classes": num_classes,
        "task": task,
        **({"thresholds": [float(t) for t in thresholds]} if task == "multilabel" else {}),
        **data_config_record(config),
        "precision": precision,
        "quantization": config.get("quantization"),
        # A name and a content hash, never a file-system path.
        "source": Path(source.onnx or source.openvino or source.ckpt_path or source.adapter).name,
        "sha256": content_hash(source.onnx or source.openvino or source.ckpt_path or source.adapter),
        "version": version,
    }
    return source


def content_hash(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of a file (an OpenVINO .xml with its .bin) or of a folder's files."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path, path.with_suffix(".bin")]
    digest = hashlib.sha256()
    for file in files:
        if file.is_file() and (file == path or path.is_dir() or path.suffix == ".xml"):
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


class _Rejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class RequestGate:
    """ASGI middleware in front of `POST /predict`: body limit, image extraction, decoding, resizing and cropping, with
    a 4xx JSON answer (`{"detail": ...}`) for every bad request; a good one goes on with its uint8 pixels.

    Args:
        app: the ASGI app (LitServe's FastAPI app).
        data_config: the model's preprocessing (input_size, mean, std, interpolation, crop_pct, crop_mode).
        max_body_bytes: larger bodies get 413 (from Content-Length before reading, else while reading).
        max_pixels: larger images get 413, read from their header.
        api_path: the route it guards.
    """

    def __init__(self, app, *, data_config: dict, max_body_bytes: int, max_pixels: int, api_path: str = API_PATH):
        self.app = app
        self.pixels = eval_stages(data_config)[0]
        self.max_body_bytes = max_body_bytes
        self.max_pixels = max_pixels
        self.api_path = api_path

    fields: tuple[str, ...] = ()  # form fields / JSON keys besides "image" handed to `_accept`

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.api_path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
            data, extra = await self._image_bytes(scope, body)
            extra = self._accept(extra)
            pixels = await asyncio.to_thread(self._preprocess, data)
        except _Rejected as err:
            await JSONResponse({"detail": err.detail}, status_code=err.status)(scope, receive, send)
            return
        payload = json.dumps({_PIXELS: base64.b64encode(pixels.tobytes()).decode("ascii"), **extra}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await self.app({**scope, "headers": headers}, _replay(payload, receive), send)

    async def _read_body(self, scope, receive) -> bytes:
        too_large = _Rejected(413, f"request body over the limit of {self.max_body_bytes / 1e6:g} MB")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Rejected(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _accept(self, extra: dict) -> dict:
        """Check the `fields` a request sent (raise `_Rejected`); returns what the worker gets besides the pixels."""
        return {}

    async def _image_bytes(self, scope, body: bytes) -> tuple[bytes, dict]:
        """(image, {field: value} of `fields`) of a multipart form (field "image"), a JSON object {"image": base64},
        or a raw image body."""
        if not body:
            raise _Rejected(400, "empty body: send the image as multipart field 'image' or JSON {\"image\": base64}")
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
        if content_type.startswith("multipart/form-data"):
            request = Request({**scope}, _replay(body, None))
            try:
                form = await request.form()
            except Exception as err:  # python-multipart's parse errors
                raise _Rejected(400, f"malformed multipart body ({err})") from None
            try:
                image = form.get("image")
                if image is None:
                    raise _Rejected(400, "the multipart body has no field 'image'")
                extra = {k: form[k] for k in self.fields if isinstance(form.get(k), str)}
                return (await image.read() if hasattr(image, "read") else image.encode()), extra
            finally:
                await form.close()
        if content_type.startswith("application/json"):
            try:
                obj = json.loads(body)
                value, extra = obj["image"], {k: obj[k] for k in self.fields if k in obj}
                if not isinstance(value, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise _Rejected(400, 'the JSON body must be an object {"image": "<base64 image bytes>"}') from None
            if value.startswith("data:") and "," in value:  # a data URL
                value = value.split(",", 1)[1]
            try:
                return base64.b64decode(value, validate=True), extra
            except (binascii.Error, ValueError):
                raise _Rejected(400, "the 'image' value is not valid base64") from None
        return body, {}

    def _preprocess(self, data: bytes) -> np.ndarray:
        try:
            image = decode_image(data, self.max_pixels)
        except ImageTooLargeError as err:
            raise _Rejected(413, str(err)) from None
        except ValueError as err:
            raise _Rejected(400, str(err)) from None
        return self.pixels(image)


def _replay(body: bytes, receive):
    """An ASGI receive that hands over `body` once, then defers to the real one (which reports a disconnect)."""
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


class ClassifierAPI(ls.LitAPI):
    """The inference worker: preprocessed images in, top-k classes out, batched by LitServe.

    Args:
        served: the model source and its metadata (the model itself is loaded in `setup`, in the worker).
        top_k: classes per answer.
        max_batch_size: the most requests run together.
        batch_timeout: seconds a batch waits to fill.
        threads: compute threads of each worker; None lets onnxruntime / OpenVINO / PyTorch choose (all cores).
        ov_precision: OpenVINO's inference precision ("f32", "bf16", or "default": OpenVINO's choice).
    """

    def __init__(
        self,
        served: ServedModel,
        top_k: int = 5,
        max_batch_size: int = 16,
        batch_timeout: float = 0.005,
        threads: int | None = None,
        ov_precision: str = "f32",
    ):
        loop = batched_loop(max_batch_size)
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH, loop=loop)
        self.served = served
        self.threads = threads
        self.ov_precision = ov_precision
        self.top_k = min(top_k, served.info["num_classes"])
        channels, height, width = served.info["input_size"]
        self.shape = (height, width, channels)
        self.classes = served.info["classes"]

    def setup(self, device: str) -> None:
        served = self.served
        self.normalize = eval_stages(served.data_config)[1]
        if served.onnx is not None or served.openvino is not None:
            import torch

            # torch only normalises the batch here: with more than one thread its idle OpenMP workers would keep
            # spinning on the cores the runtime and the HTTP process need (docs/deployment.md, "Batching").
            torch.set_num_threads(1)
        if served.onnx is not None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads or 0
            # Idle compute threads must not spin: the HTTP process needs the cores between batches (what spinning
            # cost: docs/deployment.md, "Tolerances and settings").
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(served.onnx, options, providers=["CPUExecutionProvider"])
            self.run = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            return
        if served.openvino is not None:
            from .openvino import compile_openvino

            compiled = compile_openvino(served.openvino, self.ov_precision, self.threads)
            request = compiled.create_infer_request()
            self.run = lambda x: request.infer({0: x})[0].copy()
            return
        import torch

        from ..checkpoint import load_model
        from ..lora.inject import merge_lora

        if self.threads:
            torch.set_num_threads(self.threads)
        model = merge_lora(load_model(ckpt_path=served.ckpt_path, adapter=served.adapter).model).eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).float().numpy()

        self.run = run

    def decode_request(self, request: dict) -> np.ndarray:
        return np.frombuffer(base64.b64decode(request[_PIXELS]), np.uint8).reshape(self.shape)

    def predict(self, x: np.ndarray) -> list[tuple[np.ndarray, int]] | tuple[np.ndarray, int]:
        batched = x.ndim == 4  # (N, H, W, 3) uint8, or one (H, W, 3)
        logits = self.run(self.normalize(x if batched else x[None]))  # (N, num_classes)
        rows = [(row, len(logits)) for row in logits]
        return rows if batched else rows[0]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: tuple[np.ndarray, int]) -> JSONResponse:
        logits, batch_size = output
        headers = {BATCH_HEADER: str(batch_size)}
        if self.served.info["task"] == "multilabel":
            answer = multilabel_answer(logits, self.classes, self.served.info["thresholds"])
            return JSONResponse(answer, headers=headers)
        z = logits.astype(np.float64) - logits.max()
        probs = np.exp(z) / np.exp(z).sum()
        top = np.argsort(-probs, kind="stable")[: self.top_k]
        predictions = [{"label": self.classes[i], "index": int(i), "score": float(probs[i])} for i in top]
        return JSONResponse({"predictions": predictions}, headers=headers)


def multilabel_answer(logits: np.ndarray, classes: list[str], thresholds: list[float]) -> dict:
    """A multi-label model's answer: `labels`, the classes at or over their thresholds (as `predict` writes them), and
    `scores`, every class's sigmoid probability."""
    on, probs = label_sets(logits, thresholds)  # (C,), (C,)
    labels = [c for c, yes in zip(classes, on, strict=True) if yes]
    return {"labels": labels, "scores": {c: float(p) for c, p in zip(classes, probs, strict=True)}}


def _terminate_on_sigterm() -> None:
    """SIGTERM in this process stops the server like Ctrl-C: LitServe then stops its HTTP and inference workers."""
    parent = os.getpid()

    def handler(signum, frame):
        if os.getpid() != parent:  # a forked helper process: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve(
    model: str | None = None,
    ckpt_path: str | None = None,
    adapter: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    batch_timeout_ms: float = 5.0,
    workers: int = 1,
    top_k: int = 5,
    max_pixels: float = DEFAULT_MAX_PIXELS,
    max_body_mb: float = 20.0,
    ov_precision: str = "f32",
    backbone: str | None = None,
    weights: str = "pretrained",
    adapters: str | None = None,
    max_adapters: int | None = None,
    max_adapter_mb: float = 64.0,
) -> None:
    """Serve a classifier over HTTP until SIGTERM or Ctrl-C: `POST /predict` (multipart field "image", or JSON
    {"image": base64}) answers {"predictions": [{"label", "index", "score"}, ...]}; `GET /health`; `GET /info`.

    With `--backbone NAME --adapters DIR`, many classifiers share one backbone (docs/multi-adapter.md): each request
    names its adapter (field / key "adapter"; "logits": true adds the raw logits), answers name the adapter and its
    content hash, `GET /adapters` lists them, and DIR is re-read every second. The preprocessing served is the one
    the adapters in DIR record.

    Args:
        model: an .onnx file written by `vision-lora export` (fp32, fp16 or int8), served with onnxruntime, or an
            OpenVINO IR (.xml) of `vision-lora export --format openvino`, served with OpenVINO.
        ckpt_path: instead, a checkpoint of `vision-lora fit`, merged and served with PyTorch.
        adapter: instead, an adapter directory of `vision-lora fit`, merged and served with PyTorch.
        host: the interface to bind: 127.0.0.1 (this machine only), 0.0.0.0 or ::.
        port: the TCP port.
        max_batch_size: the most concurrent requests run as one batch.
        batch_timeout_ms: how long a batch waits to fill, in milliseconds.
        workers: inference worker processes.
        top_k: classes per answer.
        max_pixels: larger images are refused (413) from their header, before decoding.
        max_body_mb: larger request bodies are refused (413).
        ov_precision: for an OpenVINO IR, its inference precision: "f32" (what the export was verified at), "bf16",
            or "default" (OpenVINO's choice for this CPU, bf16 where the CPU has it; faster, less exact).
        backbone: instead of a model source, the timm backbone that the adapters of `adapters` share.
        weights: with `backbone`, its weight source as `fit --model.weights` took it; every adapter must record it.
        adapters: with `backbone`, the folder whose sub-folders (or symlinks to them) are the adapters.
        max_adapters: with `backbone`, the most adapters kept loaded per worker (least recently used evicted).
        max_adapter_mb: with `backbone`, larger adapter folders are refused.

    Raises:
        VisionLoRAError: a bad option or model source, found before any worker starts.
    """
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise VisionLoRAError(f"--host must be 127.0.0.1, 0.0.0.0 or :: (what LitServe binds), got {host!r}.")
    if not 1024 <= port <= 65535:
        raise VisionLoRAError(f"--port must be in 1024..65535, got {port}.")
    for name, value in (("max_batch_size", max_batch_size), ("workers", workers), ("top_k", top_k)):
        if value < 1:
            raise VisionLoRAError(f"--{name} must be at least 1, got {value}.")
    if batch_timeout_ms < 0 or max_pixels < 1 or max_body_mb <= 0:
        raise VisionLoRAError("--batch_timeout_ms must be >= 0, --max_pixels and --max_body_mb positive.")
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None  # workers share the cores
    if (backbone is None) != (adapters is None):
        raise VisionLoRAError("--backbone and --adapters go together: the backbone the adapters of DIR share.")
    if backbone is not None:
        if any(s is not None for s in (model, ckpt_path, adapter)):
            raise VisionLoRAError("serve takes --backbone with --adapters, or one of --model, --ckpt_path, --adapter.")
        from .serve_adapters import adapter_server_parts

        batching = (top_k, max_batch_size, batch_timeout_ms / 1000, threads)
        parts = (backbone, weights, adapters, max_adapters, max_adapter_mb, *batching)
        api, info, (gate_class, gate) = adapter_server_parts(*parts)
        what = f"{backbone} with the adapters of {adapters}; GET /adapters"
    else:
        served = describe_model(model, ckpt_path, adapter)
        if ov_precision not in ("f32", "bf16", "f16", "default"):
            raise VisionLoRAError(f"--ov_precision must be f32, bf16, f16 or default, got {ov_precision!r}.")
        api = ClassifierAPI(served, top_k, max_batch_size, batch_timeout_ms / 1000, threads, ov_precision)
        info, gate_class, gate = served.info, RequestGate, {"data_config": served.data_config}
        what = f"{info['name']} ({info['precision']}, {info['num_classes']} classes) from {info['source']}"
    limits = {"max_batch_size": max_batch_size, "batch_timeout_ms": batch_timeout_ms, "top_k": api.top_k}
    limits |= {"max_pixels": int(max_pixels), "max_body_mb": max_body_mb, "workers": workers}
    gate |= {"max_body_bytes": int(max_body_mb * 1e6), "max_pixels": int(max_pixels)}
    server = ls.LitServer(
        api,
        accelerator="cpu",
        devices=1,
        workers_per_device=workers,
        model_metadata={**info, **limits},
        middlewares=[(gate_class, gate)],
    )
    print(
        f"vision-lora serve: {what} on http://{host}:{port}  POST {API_PATH}, GET /health, GET /info",
        file=sys.stderr,
        flush=True,
    )
    _terminate_on_sigterm()
    server.run(host=host, port=port, generate_client_file=False, access_log=False)
