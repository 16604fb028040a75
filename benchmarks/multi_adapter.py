"""Many classifiers on one backbone (issue 25): `MultiAdapterModel` and `vision-lora serve --backbone --adapters`.

    flock /tmp/vision_lora_bench.lock nice -n 5 python benchmarks/multi_adapter.py             # everything
    python benchmarks/multi_adapter.py --sections throughput --rounds 8 --out /tmp/t.json     # one part

1. answers: a multi-adapter server (EfficientNet-Lite0, offline weights, the quickstart's LoRA config: two vision_lora
   adapters, LoRA and DoRA, and a PEFT export) answers the digits test PNGs with `logits: true`; the largest
   |served - own merged model| / max |logit|, and the labels against `serve --adapter` of each vision_lora adapter,
   file by file.
2. memory: the inference worker's RSS (the process LitServe spawns) serving vit_small_patch16_224 with one adapter,
   then after 50 more r=8 adapters were added and each answered once: the growth against their total file size.
3. throughput (Python API, in this process): batch 16 spread over 8 ViT-S r=8 adapters (2 rows each, interleaved)
   against one merged model at batch 16, 224 px, and PEFT's `adapter_names` on the same batch: `--rounds`
   interleaved rounds, each a timed forward of each; the median of the per-round ratios.
4. reload: on an idle server with 8 adapters, the seconds from an adapter folder's rename into DIR to its first
   answer, for 4 adapters in turn.
5. load: `--requests` POSTs from 16 client threads over 8 quickstart-size adapters while 4 are added (time
   from the folder's rename to its first answer: the reload latency), 2 replaced by a symlink swap and 2 removed.
   Every answer is checked: status 200 with the label of the version (content hash) it names, or 404 for a removed
   adapter; anything else (5xx, a dropped connection, a wrong label, another 404) is an error.
Adapters are random (LoRA B, DoRA magnitudes and heads drawn at random) with the shapes of real ones; servers run on
127.0.0.1 and are stopped (SIGTERM, then SIGKILL) even on failure.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import psutil
import torch
from _machine import machine_info
from PIL import Image
from serve_load import multipart, server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vision_lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter  # noqa: E402
from vision_lora.deploy.multi import MultiAdapterModel  # noqa: E402
from vision_lora.lora import classifier_names  # noqa: E402
from vision_lora.preprocess import data_config_record, eval_transform, resolve_data_config  # noqa: E402
from vision_lora.weights import create_backbone  # noqa: E402

LITE0 = {"backbone": "tf_efficientnet_lite0", "weights": "offline"}
LITE0_PREPROCESS = {"input_size": 96, "crop_pct": 1.0}  # configs/quickstart.yaml
LITE0_LORA = {"target_modules": ["preset:efficientnet"], "r": 8, "lora_alpha": 16}


def make_adapter(directory: Path, backbone: str, weights: str, seed: int, peft: bool = False, **options) -> Path:
    """A random adapter with a real one's shapes (10 classes), recording what `fit` records."""
    overrides = {k: options.pop(k) for k in ("input_size", "crop_pct") if k in options}
    torch.manual_seed(seed)  # LoRA A is drawn at apply_lora: the same seed gives the same adapter in either format
    model = create_backbone(backbone, num_classes=10, weights=weights)
    apply_lora(model, LoRAConfig(**options))
    gen = torch.Generator().manual_seed(seed)
    heads = tuple(f"{h}." for h in classifier_names(model))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith(heads):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    if peft:
        return save_adapter(model, directory, format="peft")
    config = data_config_record(resolve_data_config(model, overrides))
    classes = [f"{directory.name}:{i}" for i in range(10)]
    return save_adapter(model, directory, classes, {"backbone": backbone, "weights": weights, "data_config": config})


def merged(directory: Path, backbone: str, weights: str) -> torch.nn.Module:
    return merge_lora(load_adapter(create_backbone(backbone, num_classes=10, weights=weights), directory)).eval()


def lite0_adapter(directory: Path, seed: int, **extra) -> Path:
    return make_adapter(directory, LITE0["backbone"], LITE0["weights"], seed, **LITE0_PREPROCESS, **LITE0_LORA, **extra)


def lite0_config() -> dict:
    return resolve_data_config(create_backbone(LITE0["backbone"], weights=LITE0["weights"]), LITE0_PREPROCESS)


def digits(limit: int) -> list[tuple[str, bytes]]:
    files = sorted((ROOT / "data/digits/test").rglob("*.png"))[:limit]
    return [(f"{f.parent.name}/{f.name}", f.read_bytes()) for f in files]


def post(port: int, image: bytes, adapter: str, logits: bool = False, conn=None, timeout: float = 60):
    """(status, answer) of one multipart POST; `conn` is reused when given."""
    fields = f'--serve-load-boundary\r\nContent-Disposition: form-data; name="adapter"\r\n\r\n{adapter}\r\n'
    if logits:
        fields += '--serve-load-boundary\r\nContent-Disposition: form-data; name="logits"\r\n\r\ntrue\r\n'
    body = fields.encode() + multipart(image)
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/predict", body, {"Content-Type": "multipart/form-data; boundary=serve-load-boundary"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        if own:
            conn.close()


def expected_logits(model: torch.nn.Module, images: list[tuple[str, bytes]], data_config: dict) -> torch.Tensor:
    transform = eval_transform(data_config)
    x = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in images])
    with torch.inference_mode():
        return model(x)


# -- 1. answers ------------------------------------------------------------------------------------------------------


def answers(work: Path, images: list[tuple[str, bytes]]) -> dict:
    live = work / "answers"
    kinds = {"lora": {}, "dora": {"use_dora": True}, "peft": {"peft": True}}
    for seed, (name, extra) in enumerate(kinds.items()):
        lite0_adapter(live / name, seed, **extra)
    config = lite0_config()
    result = {"images": len(images)}
    args = ["--backbone", LITE0["backbone"], "--weights", "offline", "--adapters", str(live)]
    served: dict[str, list] = {}
    with server(*args, log=work / "answers.log") as (port, _):
        for name in kinds:
            served[name] = [post(port, b, name, logits=True) for _, b in images]
    for name in kinds:
        want = expected_logits(merged(live / name, LITE0["backbone"], "offline"), images, config)
        got = torch.tensor([a["logits"] for s, a in served[name]])
        assert all(s == 200 for s, _ in served[name])
        result[f"{name}_max_rel_logit_diff"] = float(((got - want).abs().amax(1) / want.abs().amax(1)).max())
    for name in ("lora", "dora"):
        with server("--adapter", str(live / name), log=work / f"single_{name}.log") as (port, _):
            single = [post(port, b, name) for _, b in images]
        same = sum(
            s[1]["predictions"][0]["label"] == m[1]["predictions"][0]["label"]
            for s, m in zip(single, served[name], strict=True)
        )
        result[f"{name}_labels_equal_serve_adapter"] = f"{same}/{len(images)}"
    return result


# -- 2. memory -------------------------------------------------------------------------------------------------------


def worker_rss(pid: int) -> int:
    parent = psutil.Process(pid)
    workers = [p for p in parent.children(recursive=True) if "--multiprocessing-fork" in " ".join(p.cmdline())]
    return max(p.memory_info().rss for p in workers)


def wait_listed(port: int, names: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/adapters")
        listed = {row["name"] for row in json.loads(conn.getresponse().read())["adapters"] if not row["error"]}
        conn.close()
        if names <= listed:
            return
        time.sleep(0.5)
    raise RuntimeError(f"adapters not listed after {timeout} s: {sorted(names - listed)}")


def memory(work: Path, vit_weights: str, count: int) -> dict:
    live, store = work / "memory", work / "memory_store"
    make_adapter(live / "warm", "vit_small_patch16_224", vit_weights, 0, r=8)
    for i in range(count):
        make_adapter(store / f"a{i:02d}", "vit_small_patch16_224", vit_weights, i + 1, r=8)
    files = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    image = digits(1)[0][1]
    args = ["--backbone", "vit_small_patch16_224", "--weights", vit_weights, "--adapters", str(live)]
    with server(*args, log=work / "memory.log") as (port, process):
        for _ in range(3):
            assert post(port, image, "warm")[0] == 200
        time.sleep(2)
        before = worker_rss(process.pid)
        for d in sorted(store.iterdir()):
            shutil.move(str(d), str(live / d.name))
        wait_listed(port, {f"a{i:02d}" for i in range(count)})
        for i in range(count):
            assert post(port, image, f"a{i:02d}")[0] == 200
        time.sleep(2)
        after = worker_rss(process.pid)
    return {
        "adapters": count,
        "adapter_files_mb": round(files / 1e6, 2),
        "worker_rss_one_adapter_mb": round(before / 1e6, 1),
        "worker_rss_after_mb": round(after / 1e6, 1),
        "growth_mb": round((after - before) / 1e6, 2),
        "growth_over_file_size": round((after - before) / files, 3),
    }


# -- 3. throughput ---------------------------------------------------------------------------------------------------


def throughput(work: Path, vit_weights: str, rounds: int) -> dict:
    import peft

    store = work / "throughput"
    names = [f"t{i}" for i in range(8)]
    for i, name in enumerate(names):
        make_adapter(store / name, "vit_small_patch16_224", vit_weights, 100 + i, r=8)
        make_adapter(store / f"{name}_peft", "vit_small_patch16_224", vit_weights, 100 + i, peft=True, r=8)
    multi = MultiAdapterModel("vit_small_patch16_224", weights=vit_weights)
    for name in names:
        multi.add_adapter(name, store / name)
    one = merged(store / names[0], "vit_small_patch16_224", vit_weights)
    base = create_backbone("vit_small_patch16_224", num_classes=10, weights=vit_weights).eval()
    pm = peft.PeftModel.from_pretrained(base, str(store / f"{names[0]}_peft"), adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(str(store / f"{name}_peft"), adapter_name=name)
    pm.eval()
    rows = [names[i % 8] for i in range(16)]
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    runs = {
        "multi": lambda: multi(x, rows),
        "merged": lambda: one(x),
        "peft": lambda: pm(x, adapter_names=rows),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        ours, theirs = torch.stack(runs["multi"]()), runs["peft"]()
        agree = float((ours - theirs).abs().max() / theirs.abs().max())
        for run in runs.values():
            run()
        for r in range(rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for key in order:
                start = time.perf_counter()
                runs[key]()
                times[key].append(time.perf_counter() - start)
    ratio = [m / t for m, t in zip(times["merged"], times["multi"], strict=True)]
    peft_ratio = [m / t for m, t in zip(times["merged"], times["peft"], strict=True)]
    return {
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "median_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "multi_over_merged_throughput": round(statistics.median(ratio), 3),
        "multi_over_merged_per_round": [round(v, 3) for v in ratio],
        "peft_over_merged_throughput": round(statistics.median(peft_ratio), 3),
        "max_rel_logit_diff_multi_vs_peft": agree,
    }


# -- 4. load and reload ----------------------------------------------------------------------------------------------


def load(work: Path, images: list[tuple[str, bytes]], requests: int, concurrency: int) -> dict:
    live, store = work / "load", work / "load_store"
    (live / ".versions").mkdir(parents=True)
    config = lite0_config()
    initial = [f"s{i}" for i in range(8)]
    added, swapped, removed = ["n0", "n1", "n2", "n3"], initial[:2], initial[2:4]
    dirs = {}
    for seed, name in enumerate(initial + added):
        target = (live / ".versions" / f"{name}.v1") if name in swapped else (store if name in added else live) / name
        dirs[name, 1] = lite0_adapter(target, seed)
        if name in swapped:
            (live / name).symlink_to(f".versions/{name}.v1")
            dirs[name, 2] = lite0_adapter(live / ".versions" / f"{name}.v2", 50 + seed)
    from vision_lora.deploy.adapters import inspect_adapter

    labels: dict[str, list[int]] = {}  # content hash -> label index per image
    for directory in dirs.values():
        logits = expected_logits(merged(directory, LITE0["backbone"], "offline"), images, config)
        labels[inspect_adapter(directory).sha256] = logits.argmax(1).tolist()
    active, gone = list(initial), set()
    counts = {"ok": 0, "404_removed": 0, "errors": 0}
    errors: list[str] = []
    latencies: dict[str, float] = {}
    lock, sent = threading.Lock(), [0]
    rng = random.Random(0)

    def client() -> None:
        conn = None
        while True:
            with lock:
                if sent[0] >= requests:
                    return
                sent[0] += 1
                i = sent[0]
                name = rng.choice(sorted(gone)) if gone and i % 50 == 0 else rng.choice(active)
            k = i % len(images)
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status, answer = post(port, images[k][1], name, conn=conn)
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
                conn = None
                status, answer = -1, {"detail": f"{type(err).__name__}: {err}"}
            with lock:
                right = (
                    status == 200
                    and labels.get(answer.get("sha256"), [None] * len(images))[k] == answer["predictions"][0]["index"]
                )
                if right:
                    counts["ok"] += 1
                elif status == 404 and name in gone:
                    counts["404_removed"] += 1
                else:
                    counts["errors"] += 1
                    errors.append(f"{name} {status} {str(answer)[:200]}")

    def controller() -> None:
        def at(fraction: float) -> None:
            while sent[0] < fraction * requests:
                time.sleep(0.05)

        at(0.1)
        for name in added:
            shutil.move(str(dirs[name, 1]), str(live / f".{name}.staging"))
            start = time.monotonic()
            (live / f".{name}.staging").rename(live / name)
            while post(port, images[0][1], name)[0] != 200:
                time.sleep(0.05)
                assert time.monotonic() - start < 30
            latencies[name] = round(time.monotonic() - start, 2)
            with lock:
                active.append(name)
        at(0.4)
        for name in swapped:
            (live / f"{name}.tmp").symlink_to(f".versions/{name}.v2")
            (live / f"{name}.tmp").rename(live / name)  # mv -T: atomic
        at(0.6)
        for name in removed:
            with lock:
                active.remove(name)
                gone.add(name)
            shutil.rmtree(live / name)

    args = ["--backbone", LITE0["backbone"], "--weights", "offline", "--adapters", str(live)]
    with server(*args, log=work / "load.log") as (port, _):
        start = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        control = threading.Thread(target=controller)
        for t in [*threads, control]:
            t.start()
        for t in [*threads, control]:
            t.join(timeout=3600)
        seconds = time.monotonic() - start
    return {
        "requests": requests,
        "concurrency": concurrency,
        "seconds": round(seconds, 1),
        **counts,
        "first_errors": errors[:10],
        "reload_latency_s": latencies,
    }


def reload(work: Path, images: list[tuple[str, bytes]], adds: int = 4) -> dict:
    """An idle server with 8 adapters: seconds from an adapter folder's rename into DIR to its first answer."""
    live, store = work / "reload", work / "reload_store"
    for i in range(8):
        lite0_adapter(live / f"r{i}", i)
    for i in range(adds):
        lite0_adapter(store / f"x{i}", 20 + i)
    latencies = []
    args = ["--backbone", LITE0["backbone"], "--weights", "offline", "--adapters", str(live)]
    with server(*args, log=work / "reload.log") as (port, _):
        for i in range(8):
            assert post(port, images[0][1], f"r{i}")[0] == 200
        for i in range(adds):
            time.sleep(1.5)  # a new poll period
            start = time.monotonic()
            (store / f"x{i}").rename(live / f"x{i}")
            while post(port, images[0][1], f"x{i}")[0] != 200:
                assert time.monotonic() - start < 60
                time.sleep(0.1)
            latencies.append(round(time.monotonic() - start, 2))
    return {"adds": adds, "latency_s": latencies, "max_latency_s": max(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="answers,memory,throughput,reload,load")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--memory_adapters", type=int, default=50)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/multi_adapter.json"))
    args = parser.parse_args()
    sections = args.sections.split(",")
    results = {"date": date.today().isoformat(), "command": " ".join(["python", *sys.argv])}
    results["machine"] = machine_info(threads=torch.get_num_threads())
    images = digits(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        vit_weights = str(work / "vit_small.safetensors")
        from safetensors.torch import save_file

        save_file(create_backbone("vit_small_patch16_224").state_dict(), vit_weights)
        for section in sections:
            start = time.monotonic()
            if section == "answers":
                results[section] = answers(work, images)
            elif section == "memory":
                results[section] = memory(work, vit_weights, args.memory_adapters)
            elif section == "throughput":
                results[section] = throughput(work, vit_weights, args.rounds)
            elif section == "load":
                results[section] = load(work, images, args.requests, args.concurrency)
            elif section == "reload":
                results[section] = reload(work, images)
            results[section]["section_seconds"] = round(time.monotonic() - start, 1)
            print(json.dumps({section: results[section]}, indent=2), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
