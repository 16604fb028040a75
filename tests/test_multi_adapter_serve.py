"""`vision-lora serve --backbone --adapters DIR` against a real server process on a free local port: mixed batches
answered with each adapter's own merged logits, `GET /adapters`, bad adapters refused while the rest serve, hot reload
(add, symlink swap, remove) and LRU eviction."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_multi_adapter import make_adapter, merged_logits
from test_serve import multipart, serving

from vision_lora.preprocess import eval_transform, resolve_data_config

SIDE = 32
MULTILABEL = {"task": "multilabel", "thresholds": [0.3, 0.5, 0.7, 0.5]}  # as `fit` records a multi-label model


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def ask(server, image: bytes, adapter: str | None, logits: bool = False, as_json: bool = False):
    if as_json:
        body = {"image": base64.b64encode(image).decode(), "logits": logits}
        if adapter is not None:
            body["adapter"] = adapter
        return server.predict(json.dumps(body).encode(), "application/json")
    body, content_type = multipart(image)  # the image part, then the text fields before the closing boundary
    boundary = content_type.split("boundary=")[1]
    fields = {"adapter": adapter, "logits": "true" if logits else None}
    text = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
        if v is not None
    )
    body = body.removesuffix(f"--{boundary}--\r\n".encode()) + text.encode() + f"--{boundary}--\r\n".encode()
    return server.predict(body, content_type)


def wait_for(check, timeout: float = 5.0) -> float:
    """Seconds until `check()` is true (fails after `timeout`)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "not within the time limit"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("multi_serve")
    torch.manual_seed(0)
    weights = work / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    store, live = work / "store", work / "adapters"
    live.mkdir()
    kwargs = {"weights": weights, "backbone": "test_resnet", "input_size": SIDE}
    good = {
        "digits": make_adapter(store, "digits", num_classes=3, seed=1, r=2, **kwargs),
        "dora": make_adapter(store, "dora", num_classes=4, seed=2, r=4, use_dora=True, **kwargs),
        "peft": make_adapter(store, "peft", num_classes=2, seed=3, r=2, format="peft", **kwargs),
        "tags": make_adapter(store, "tags", num_classes=4, seed=7, r=2, task_metadata=MULTILABEL, **kwargs),
    }
    for name, directory in good.items():
        shutil.copytree(directory, live / name)
    truncated = shutil.copytree(good["digits"], live / "truncated")
    data = (truncated / "adapter.safetensors").read_bytes()
    (truncated / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    vit_weights = work / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), vit_weights)
    make_adapter(live, "other_backbone", vit_weights, "test_vit", r=2)
    make_adapter(live, "other_size", weights, "test_resnet", r=2, input_size=2 * SIDE)
    pickled = shutil.copytree(good["peft"], live / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    make_adapter(live, "no_thresholds", num_classes=4, r=2, task_metadata={"task": "multilabel"}, **kwargs)
    oversize = shutil.copytree(good["digits"], live / "oversize")
    (oversize / "notes.txt").write_bytes(b"x" * 1_100_000)
    extra = {
        "new": make_adapter(store, "new", num_classes=5, seed=4, r=2, **kwargs),
        "v1": make_adapter(store, "v1", num_classes=3, seed=5, r=2, **kwargs),
        "v2": make_adapter(store, "v2", num_classes=3, seed=6, r=3, **kwargs),
    }
    return {"work": work, "weights": weights, "live": live, "good": good, "extra": extra}


@pytest.fixture(scope="module")
def server(setup):
    args = ["--backbone", "test_resnet", "--weights", str(setup["weights"]), "--adapters", str(setup["live"])]
    args += ["--max_adapters", "2", "--max_adapter_mb", "1", "--batch_timeout_ms", "200"]
    with serving(*args, log=setup["work"] / "server.log") as server:
        yield server


def expected(setup, name: str, directory: Path, image: bytes) -> torch.Tensor:
    config = resolve_data_config(timm.create_model("test_resnet"), {"input_size": SIDE})
    x = eval_transform(config)(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    return merged_logits(directory, x, "test_resnet", setup["weights"])[0]


def test_mixed_requests_get_their_adapters_merged_logits(setup, server):
    images = [png(i) for i in range(12)]
    names = ["digits", "dora", "peft", "tags"] * 3
    answers: dict[int, tuple] = {}

    def send(i: int) -> None:
        answers[i] = ask(server, images[i], names[i], logits=True, as_json=i % 2 == 1)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    hashes = {row["name"]: row.get("sha256") for row in json.loads(server.request("GET", "/adapters")[2])["adapters"]}
    for i, (status, _, answer) in sorted(answers.items()):
        assert status == 200, answer
        want = expected(setup, names[i], setup["good"][names[i]], images[i])
        got = torch.tensor(answer["logits"])
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
        assert answer["adapter"] == names[i] and answer["sha256"] == hashes[names[i]]
        if names[i] != "tags":
            assert answer["predictions"][0]["index"] == int(want.argmax())
            continue
        probs = torch.sigmoid(want)  # a multi-label adapter answers its label set at its own thresholds
        labels = [f"tags-{c}" for c in range(4) if probs[c] >= MULTILABEL["thresholds"][c]]
        assert answer["labels"] == labels and "predictions" not in answer
        torch.testing.assert_close(torch.tensor(list(answer["scores"].values())), probs, rtol=0, atol=1e-4)
    assert max(int(h["x-batch-size"]) for _, h, _ in answers.values()) > 1  # different adapters in one batch


def test_bad_adapters_are_listed_with_their_error_and_refused(setup, server):
    status, _, data = server.request("GET", "/adapters")
    rows = {row["name"]: row for row in json.loads(data)["adapters"]}
    assert status == 200 and {"digits", "dora", "peft"} <= set(rows)
    assert rows["dora"]["classes"] == [f"dora-{i}" for i in range(4)] and rows["dora"]["rank"] == 4
    assert rows["peft"]["format"] == "peft" and rows["digits"]["error"] is None
    assert rows["tags"]["task"] == "multilabel" and rows["digits"]["task"] == "multiclass"
    reasons = {
        "truncated": "not a complete safetensors file",
        "other_backbone": "trained on 'test_vit'",
        "other_size": "preprocessing differs",
        "pickled": "a pickle format",
        "oversize": "over the cap",
        "no_thresholds": "without 4 per-class thresholds",
    }
    image = png(0)
    for name, reason in reasons.items():
        assert reason in rows[name]["error"], rows[name]
        status, _, answer = ask(server, image, name)
        assert status == 404 and reason in answer["detail"]
    assert ask(server, image, "../digits")[0] == 400
    assert ask(server, image, "missing")[0] == 404
    assert ask(server, image, None)[0] == 400
    assert ask(server, image, "digits")[0] == 200  # the others keep serving
    listing = server.request("GET", "/adapters")[2] + server.request("GET", "/info")[2]
    assert str(setup["work"]) not in listing.decode() and "/tmp" not in listing.decode()  # no file-system paths


def test_hot_reload_add_swap_remove_and_lru(setup, server):
    live, extra, image = setup["live"], setup["extra"], png(1)
    shutil.copytree(extra["new"], live / ".staging_new")
    (live / ".staging_new").rename(live / "new")
    time.sleep(0.3)  # past the gate's least re-read interval; its next poll may be up to a second away
    assert ask(server, image, "new")[0] == 200  # the first request for a new name finds it
    versions = live / ".versions"
    versions.mkdir()
    for v in ("v1", "v2"):
        shutil.copytree(extra[v], versions / v)
    (live / "swap").symlink_to(".versions/v1")
    wait_for(lambda: ask(server, image, "swap")[0] == 200)
    first = ask(server, image, "swap", logits=True)[2]
    (live / "swap.tmp").symlink_to(".versions/v2")
    (live / "swap.tmp").rename(live / "swap")  # mv -T: atomic
    wait_for(lambda: ask(server, image, "swap")[2]["sha256"] != first["sha256"])
    second = ask(server, image, "swap", logits=True)[2]
    want = expected(setup, "swap", extra["v2"], image)
    assert float((torch.tensor(second["logits"]) - want).abs().max() / want.abs().max()) < 1e-4
    shutil.rmtree(live / "new")
    wait_for(lambda: ask(server, image, "new")[0] == 404)
    # --max_adapters 2: five adapters in turn, each evicted and reloaded, answers unchanged
    for _ in range(2):
        for name in ("digits", "dora", "peft", "swap"):
            status, _, answer = ask(server, image, name, logits=True)
            directory = extra["v2"] if name == "swap" else setup["good"][name]
            want = expected(setup, name, directory, image)
            assert status == 200 and float((torch.tensor(answer["logits"]) - want).abs().max()) < 1e-4 * float(
                want.abs().max()
            )
