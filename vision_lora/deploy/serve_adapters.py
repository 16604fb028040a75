"""`vision-lora serve --backbone NAME --adapters DIR`: many classifiers on one backbone over HTTP, with mixed batches
and hot reload.

Every sub-folder of DIR is an adapter named after it. The HTTP process (`AdapterGate`) polls DIR every second, and
re-reads it at once (at most five times a second) for a name it has not seen; it answers what needs no model: a bad
or unknown adapter name (400 / 404) before the request reaches a batch, and `GET /adapters`. Each inference worker
(`AdapterAPI`) holds one `MultiAdapterModel`, re-reads DIR between batches (at most a second apart, and at once for a
name it has not seen), loads adapters on demand (keeping at most `max_adapters`, least recently used evicted) and runs
a batch of requests for different adapters together, answering each in its own place. A replacement (a swapped
symlink) is loaded between two batches, so a batch runs on one version.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from collections import Counter, OrderedDict

import litserve as ls
import numpy as np
from starlette.responses import JSONResponse

from ..errors import VisionLoRAError
from ..preprocess import data_config_record, eval_stages
from .adapters import AdapterDirectory, BackboneSpec, check_name
from .batching import batched_loop
from .serve import _PIXELS, API_PATH, BATCH_HEADER, RequestGate, _Rejected, multilabel_answer

__all__ = ["ADAPTERS_PATH", "AdapterAPI", "AdapterGate", "adapter_server_parts"]

ADAPTERS_PATH = "/adapters"
POLL_SECONDS = 1.0
RESCAN_SECONDS = 0.2  # the least time between two re-reads of DIR that requests for unknown names trigger


def _log(message: str) -> None:
    print(f"vision-lora serve: {message}", file=sys.stderr, flush=True)


def _flag(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


class AdapterGate(RequestGate):
    """`RequestGate` for the multi-adapter server: requests must name an adapter of DIR that loads (field / key
    "adapter"; 400 for a bad name, 404 for an unknown or refused one) and may ask for the logits ("logits": true);
    `GET /adapters` lists the adapters of DIR.

    Args:
        app: the ASGI app.
        adapters_dir: the adapters folder.
        backbone: what the adapters must fit.
        max_adapter_bytes: the cap on one adapter's files.
        **limits: `RequestGate`'s limits (data_config, max_body_bytes, max_pixels).
    """

    fields = ("adapter", "logits")

    def __init__(self, app, *, adapters_dir: str, backbone: BackboneSpec, max_adapter_bytes: int, **limits) -> None:
        super().__init__(app, **limits)
        self.directory = AdapterDirectory(adapters_dir, backbone, max_adapter_bytes)
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.poller_pid: int | None = None
        self.refreshed = 0.0
        self._refresh()

    def _refresh(self) -> None:
        with self.lock:
            self.refreshed = time.monotonic()
            added, changed, removed = self.directory.refresh()
            for name in sorted(added | changed):
                entry = self.directory.entries[name]
                what = f"refused: {entry.error}" if entry.error else f"sha256 {entry.spec.sha256}"
                _log(f"adapter {name!r} {'added' if name in added else 'changed'} ({what})")
            for name in sorted(removed):
                _log(f"adapter {name!r} removed")

    def _poll(self) -> None:
        while True:
            time.sleep(POLL_SECONDS)
            try:
                self._refresh()
            except Exception as err:  # noqa: BLE001 - the poller must outlive any one bad folder state
                _log(f"reading the adapters folder failed ({type(err).__name__}: {err})")

    async def __call__(self, scope, receive, send) -> None:
        if self.poller_pid != os.getpid():  # started here, in the HTTP process that serves the requests
            self.poller_pid = os.getpid()
            threading.Thread(target=self._poll, name="adapter-poller", daemon=True).start()
        if scope["type"] == "http" and scope["path"] == ADAPTERS_PATH and scope["method"] == "GET":
            await JSONResponse({"adapters": self.listing()})(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def listing(self) -> list[dict]:
        """Name, classes, rank, format, content hash and request count of every adapter, or its load error."""
        rows = []
        with self.lock:
            for name, entry in sorted(self.directory.entries.items()):
                row = {"name": name, "requests": self.requests[name]}
                if entry.spec is None:
                    rows.append({**row, "error": entry.error})
                    continue
                spec = entry.spec
                rows.append(
                    {
                        **row,
                        "classes": spec.class_names,
                        "num_classes": spec.num_classes,
                        "rank": spec.rank,
                        "dora": spec.use_dora,
                        "task": spec.task,
                        "format": spec.format,
                        "sha256": spec.sha256,
                        "error": None,
                    }
                )
        return rows

    def _accept(self, extra: dict) -> dict:
        name = extra.get("adapter")
        if name is None:
            raise _Rejected(400, "name the adapter: multipart field 'adapter' or JSON key \"adapter\" (GET /adapters)")
        try:
            check_name(name)
        except VisionLoRAError as err:
            raise _Rejected(400, str(err)) from None
        if name not in self.directory.entries and time.monotonic() - self.refreshed >= RESCAN_SECONDS:
            self._refresh()  # a name not seen yet: a folder added since the last poll answers at once
        with self.lock:
            entry = self.directory.entries.get(name)
            if entry is None:
                raise _Rejected(404, f"no adapter named {name!r} (GET /adapters lists them)")
            if entry.spec is None:
                raise _Rejected(404, f"adapter {name!r} cannot serve: {entry.error}")
            self.requests[name] += 1
        return {"adapter": name, "logits": _flag(extra.get("logits"))}


class AdapterAPI(ls.LitAPI):
    """The inference worker: (pixels, adapter, logits flag) in, per-request answers out, batched across adapters.

    Args:
        backbone: the backbone and preprocessing served.
        adapters_dir: the adapters folder.
        max_adapter_bytes: the cap on one adapter's files.
        max_adapters: the most adapters kept loaded (None: all).
        top_k: classes per answer (at most each adapter's class count).
        max_batch_size: the most requests run together.
        batch_timeout: seconds a batch waits to fill.
        threads: PyTorch compute threads (None: PyTorch's choice).
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        adapters_dir: str,
        max_adapter_bytes: int,
        max_adapters: int | None = None,
        top_k: int = 5,
        max_batch_size: int = 16,
        batch_timeout: float = 0.005,
        threads: int | None = None,
    ) -> None:
        loop = batched_loop(max_batch_size)
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH, loop=loop)
        self.backbone, self.adapters_dir = backbone, adapters_dir
        self.max_adapter_bytes, self.max_adapters = max_adapter_bytes, max_adapters
        self.top_k, self.threads = top_k, threads
        channels, height, width = backbone.data_config["input_size"]
        self.shape = (height, width, channels)

    def setup(self, device: str) -> None:
        import torch

        from .multi import MultiAdapterModel

        if self.threads:
            torch.set_num_threads(self.threads)
        spec = self.backbone
        self.multi = MultiAdapterModel(spec.name, spec.weights, data_config=spec.data_config)
        self.directory = AdapterDirectory(self.adapters_dir, spec, self.max_adapter_bytes)
        self.normalize = eval_stages(spec.data_config)[1]
        self.loaded: OrderedDict[str, tuple] = OrderedDict()  # name -> signature of the loaded version, LRU order
        self.refreshed = 0.0
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.refreshed < POLL_SECONDS:
            return
        self.refreshed = time.monotonic()
        _, changed, removed = self.directory.refresh()
        for name in removed | (changed & set(self.loaded)):  # a changed one is reloaded when next asked for
            self.multi.remove_adapter(name, missing_ok=True)
            self.loaded.pop(name, None)

    def _ensure(self, name: str) -> tuple[int, str] | None:
        """Load `name` unless its current version is loaded; (status, detail) when it cannot serve."""
        entry = self.directory.entries.get(name)
        if entry is None:
            return 404, f"no adapter named {name!r} (GET /adapters lists them)"
        if entry.spec is None:
            return 404, f"adapter {name!r} cannot serve: {entry.error}"
        if self.loaded.get(name) == entry.signature:
            self.loaded.move_to_end(name)
            return None
        try:
            self.multi.add_adapter(name, entry.spec.path, self.max_adapter_bytes)
        except (ValueError, OSError) as err:  # VisionLoRAError is a ValueError
            entry.spec, entry.error = None, f"{type(err).__name__}: {str(err).replace(entry.signature[0], name)}"
            self.multi.remove_adapter(name, missing_ok=True)
            self.loaded.pop(name, None)
            _log(f"adapter {name!r} failed to load: {entry.error}")
            return 404, f"adapter {name!r} cannot serve: {entry.error}"
        self.loaded[name] = entry.signature
        return None

    def _evict(self, keep: set[str]) -> None:
        while self.max_adapters is not None and len(self.loaded) > self.max_adapters:
            name = next((n for n in self.loaded if n not in keep), None)
            if name is None:
                return
            self.multi.remove_adapter(name, missing_ok=True)
            del self.loaded[name]

    def decode_request(self, request: dict) -> tuple[np.ndarray, str, bool]:
        pixels = np.frombuffer(base64.b64decode(request[_PIXELS]), np.uint8).reshape(self.shape)
        return pixels, request["adapter"], bool(request.get("logits"))

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, inputs: list | tuple) -> list[dict] | dict:
        import torch

        batched = isinstance(inputs, list)
        inputs = inputs if batched else [inputs]
        names = {name for _, name, _ in inputs}
        self._refresh(force=not names <= set(self.directory.entries))
        answers: list[dict] = [{} for _ in inputs]
        ready = []
        for i, (_, name, _) in enumerate(inputs):
            refused = self._ensure(name)
            if refused is not None:
                answers[i] = {"status": refused[0], "detail": refused[1]}
            else:
                ready.append(i)
        if ready:
            x = torch.from_numpy(self.normalize(np.stack([inputs[i][0] for i in ready])))  # (n, 3, H, W)
            try:
                with torch.inference_mode():
                    logits = self.multi(x, [inputs[i][1] for i in ready])
            except Exception as err:  # noqa: BLE001 - answered per request, never a failed batch
                _log(f"a batch failed ({type(err).__name__}: {err})")
                logits = None
            for j, i in enumerate(ready):
                _, name, want_logits = inputs[i]
                if logits is None:
                    answers[i] = {"status": 500, "detail": "inference failed; see the server log"}
                    continue
                spec = self.multi.adapters[name]
                row = logits[j].float().numpy()
                answers[i] = {"adapter": name, "sha256": spec.sha256, "classes": spec.class_names, "logits": row}
                answers[i] |= {"thresholds": spec.thresholds}
                answers[i] |= {"want_logits": want_logits, "batch": len(ready)}
        self._evict(keep=names)
        return answers if batched else answers[0]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: dict) -> JSONResponse:
        if "status" in output:
            return JSONResponse({"detail": output["detail"]}, status_code=output["status"])
        logits, classes = output["logits"], output["classes"]
        body = {"adapter": output["adapter"], "sha256": output["sha256"]}
        if output["thresholds"] is not None:  # a multi-label adapter: its label set, as the single-model server
            body |= multilabel_answer(logits, classes, output["thresholds"])
        else:
            z = logits.astype(np.float64) - logits.max()
            probs = np.exp(z) / np.exp(z).sum()
            top = np.argsort(-probs, kind="stable")[: self.top_k]
            body["predictions"] = [{"label": classes[i], "index": int(i), "score": float(probs[i])} for i in top]
        if output["want_logits"]:
            body["logits"] = [float(v) for v in logits]
        return JSONResponse(body, headers={BATCH_HEADER: str(output["batch"])})


def _recorded_preprocessing(adapters: str, backbone: str, max_bytes: int) -> dict | None:
    """The preprocessing that the adapters of `backbone` in the folder record (None: none records one).

    Raises:
        VisionLoRAError: two kinds of preprocessing are recorded equally often, so neither is the folder's.
    """
    directory = AdapterDirectory(adapters, None, max_bytes)
    directory.refresh()
    specs = [e.spec for e in directory.entries.values() if e.spec is not None and e.spec.model_name == backbone]
    counts = Counter(json.dumps(data_config_record(s.data_config)) for s in specs if s.data_config is not None)
    if not counts:
        return None
    (top, n), *rest = counts.most_common()
    if rest and rest[0][1] == n:
        raise VisionLoRAError(
            f"the adapters in {adapters} record different preprocessing ({top} and {rest[0][0]}), {n} each; one "
            f"backbone serves one preprocessing: keep the adapters of one kind in the folder."
        )
    return json.loads(top)


def adapter_server_parts(
    backbone: str,
    weights: str,
    adapters: str,
    max_adapters: int | None,
    max_adapter_mb: float,
    top_k: int,
    max_batch_size: int,
    batch_timeout: float,
    threads: int | None,
) -> tuple[AdapterAPI, dict, tuple]:
    """(the LitAPI, the `GET /info` metadata, the gate middleware) of a multi-adapter server, checked in this process
    before any worker starts. The preprocessing served is the one most adapters of the folder record (the others
    are refused, with the difference), else timm's for the backbone.

    Raises:
        VisionLoRAError: no adapters folder, a bad limit, or a backbone / weight source that cannot be loaded.
    """
    from .multi import resolve_backbone

    if not os.path.isdir(adapters):
        raise VisionLoRAError(f"--adapters {adapters} is not a folder; make one with a sub-folder per adapter.")
    if max_adapters is not None and max_adapters < 1:
        raise VisionLoRAError(f"--max_adapters must be at least 1, got {max_adapters}.")
    if max_adapter_mb <= 0:
        raise VisionLoRAError(f"--max_adapter_mb must be positive, got {max_adapter_mb}.")
    max_bytes = int(max_adapter_mb * 1e6)
    _, spec = resolve_backbone(backbone, weights, data_config=_recorded_preprocessing(adapters, backbone, max_bytes))
    api = AdapterAPI(spec, adapters, max_bytes, max_adapters, top_k, max_batch_size, batch_timeout, threads)
    weights_shown = os.path.basename(weights) if os.path.isfile(weights) else weights  # never a path
    info = {
        "name": backbone,
        "weights": weights_shown,
        "adapters": f"GET {ADAPTERS_PATH}",
        **data_config_record(spec.data_config),
        "precision": "float32 (PyTorch)",
        "max_adapters": max_adapters,
        "max_adapter_mb": max_adapter_mb,
    }
    gate = {"adapters_dir": adapters, "backbone": spec, "max_adapter_bytes": max_bytes}
    gate |= {"data_config": spec.data_config}
    return api, info, (AdapterGate, gate)
