"""Load test of `vision-lora serve`, and int8 against float32 ONNX, on this CPU.

    vision-lora fit --config configs/quickstart.yaml        # writes runs/quickstart/version_N/checkpoints/best-*.ckpt
    python benchmarks/serve_load.py                          # newest quickstart checkpoint
    python benchmarks/serve_load.py --ckpt_path best.ckpt --requests 540 --long_requests 10000 --out serve_load.json

1. Runs `vision-lora test` on the checkpoint (its accuracy and its list of misclassified files are what the served
   answers must equal), exports it to float32 ONNX and to int8 (`--quantize int8`: calibrated on train, agreement
   on test).
2. Serves the float32 file on 127.0.0.1 and sends the digits test PNGs (multipart) from 1, 4, 16, 64 client threads,
   `--requests` per level (and at most `--max_seconds` each): requests/s, p50/p95/p99 latency, errors, the batch
   sizes the server reports, the server's peak RSS, and the accuracy of the served answers against the labels.
3. `--long_requests` at concurrency 16 for the error count of a longer run, then `--rounds` alternating runs at
   concurrency 16 against this server and one with `--max_batch_size 1`: the batching speed-up is their median ratio,
   with the CPU time per request of the client, the HTTP process and the inference worker (where the time goes), and
   onnxruntime's own CPU time per image at batch 1 and 16 (what batching can save on this CPU at most).
4. onnxruntime latency of float32 and int8 at batch 1 and 16, for the quickstart model and vit_small_patch16_224
   (random weights, 10-class head; calibrated on the digits), measured alternately; file sizes.
Every loop is bounded in count and time; every server is stopped (SIGTERM, then SIGKILL) even on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "serve-load-boundary"


def multipart(data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'.encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(*args: str, log: Path):
    """`vision-lora serve` in its own process group on a free port; yields (port, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "vision_lora.cli", "serve", *args, "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            time.sleep(0.3)
        yield port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class PeakMemory:
    """Samples the memory of a process and its children every 0.2 s in a thread: the peak of the summed RSS (which
    counts the pages forked processes share once per process) and of the summed PSS (shared pages split between
    their users: what the server tree really occupies)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.rss, self.pss, self.stop = pid, 0, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(self.pid)
                tree = [parent, *parent.children(recursive=True)]
                info = [p.memory_full_info() for p in tree]
                self.rss = max(self.rss, sum(m.rss for m in info))
                self.pss = max(self.pss, sum(getattr(m, "pss", m.rss) for m in info))
            time.sleep(0.2)

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"peak_rss_mb": round(self.rss / 1e6), "peak_pss_mb": round(self.pss / 1e6)}


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the client), of the server's inference worker (LitServe
    starts it with multiprocessing's spawn) and of its other processes (the HTTP server)."""
    seconds = {"client": sum(psutil.Process().cpu_times()[:2]), "inference": 0.0, "http": 0.0}
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(server_pid)
        for process in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                kind = "inference" if "--multiprocessing-fork" in process.cmdline() else "http"
                seconds[kind] += sum(process.cpu_times()[:2])
    return seconds


def load(
    port: int,
    bodies: list[bytes],
    labels: list[str],
    concurrency: int,
    requests: int,
    max_seconds: float,
    server_pid: int | None = None,
    wrong: set | None = None,
):
    """`requests` POSTs from `concurrency` threads (each with its own keep-alive connection), cycling through
    `bodies`; stops early after `max_seconds`. Returns the figures of the run, with the CPU milliseconds per request
    of each process when `server_pid` is given; the indices of wrongly answered bodies are added to `wrong`."""
    lock, next_index = threading.Lock(), [0]
    latencies, errors, batch_sizes, correct = [], [], [], [0]
    cpu_before = cpu_seconds(server_pid) if server_pid else None
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        while time.monotonic() < deadline:
            with lock:
                i = next_index[0]
                if i >= requests:
                    break
                next_index[0] += 1
            k = i % len(bodies)
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=bodies[k], headers=headers)
                response = conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - start
                if response.status != 200:
                    errors.append(response.status)
                    continue
                answer = json.loads(data)["predictions"][0]["label"]
                with lock:
                    latencies.append(elapsed)
                    batch_sizes.append(int(response.getheader("X-Batch-Size", "0")))
                    correct[0] += answer == labels[k]
                    if wrong is not None and answer != labels[k]:
                        wrong.add(k)
            except (OSError, http.client.HTTPException, ValueError) as err:
                errors.append(type(err).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_seconds + 120)
    wall = time.perf_counter() - begin
    ms = np.array(latencies) * 1000
    done = len(latencies)
    cpu = {}
    if cpu_before is not None and done:
        after = cpu_seconds(server_pid)
        cpu = {"cpu_ms_per_request": {k: round((after[k] - v) * 1000 / done, 2) for k, v in cpu_before.items()}}
    return {
        "concurrency": concurrency,
        "requests": done + len(errors),
        "errors": len(errors),
        "req_per_s": round(done / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if done else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 1) if done else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if done else None,
        "mean_batch": round(float(np.mean(batch_sizes)), 2) if done else None,
        "max_batch": int(max(batch_sizes)) if done else None,
        "accuracy": round(correct[0] / done, 4) if done else None,
        "seconds": round(wall, 1),
        **cpu,
    }


def ort_latency(paths: dict[str, Path], input_size: list[int], batch: int, reps: int) -> dict[str, float]:
    """Median onnxruntime latency (ms) of each file at `batch`, measured in alternating rounds."""
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"input": x})
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append((time.perf_counter() - start) * 1000)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def ort_cpu_per_image(path: Path, input_size: list[int], images: int = 256) -> dict[str, float]:
    """onnxruntime's CPU milliseconds per image at batch 1 and 16, one compute thread: the most that batching can
    save per request on this CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = {}
    for batch in (1, 16):
        x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
        session.run(None, {"input": x})
        start = time.process_time()
        for _ in range(images // batch):
            session.run(None, {"input": x})
        out[f"batch{batch}"] = round((time.process_time() - start) * 1000 / images, 2)
    return out


def vision_lora_test(ckpt: str, data: str) -> dict:
    """`vision-lora test` on the checkpoint with the quickstart config: test_acc and the misclassified files (the
    run's test/errors.csv)."""
    command = [sys.executable, "-m", "vision_lora.cli", "test", "--config", str(ROOT / "configs/quickstart.yaml")]
    command += ["--ckpt_path", ckpt, f"--data.root={data}", "--trainer.enable_progress_bar=false"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"vision-lora test failed:\n{done.stderr[-3000:]}")
    row = next(line for line in done.stdout.splitlines() if " test_acc " in line)
    errors = Path(ckpt).parents[1] / "test" / "errors.csv"
    with open(errors) as f:
        misclassified = sorted(str((ROOT / r["path"]).resolve()) for r in csv.DictReader(f))
    return {"test_acc": round(float(row.split()[-2]), 4), "misclassified": misclassified, "errors_csv": str(errors)}


def int8_figures(name: str, fp32: Path, int8: Path, input_size: list[int], reps: int) -> dict:
    out = {
        "model": name,
        "fp32_mb": round(fp32.stat().st_size / 1e6, 2),
        "int8_mb": round(int8.stat().st_size / 1e6, 2),
    }
    out["size_ratio"] = round(int8.stat().st_size / fp32.stat().st_size, 3)
    for batch, n in ((1, reps), (16, max(5, reps // 4))):
        ms = ort_latency({"fp32": fp32, "int8": int8}, input_size, batch, n)
        out[f"fp32_ms_b{batch}"], out[f"int8_ms_b{batch}"] = ms["fp32"], ms["int8"]
        out[f"latency_ratio_b{batch}"] = round(ms["int8"] / ms["fp32"], 3)
    return out


def vit_int8(tmp: Path, calib_dir: Path) -> tuple[Path, Path]:
    """vit_small_patch16_224 with random weights and a 10-class head, exported and quantized (calibrated on the
    digits at 224 px; agreement is not meaningful for random weights, so the minimum is 0)."""
    import timm
    import torch

    from vision_lora.export import export_onnx, image_files, preprocess_files, quantize_int8

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=10).eval()
    cfg = timm.data.resolve_model_data_config(model)
    fp32, int8 = tmp / "vit_small.fp32.onnx", tmp / "vit_small.int8.onnx"
    export_onnx(model, fp32)
    images = preprocess_files(image_files(calib_dir, 64), cfg)
    quantize_int8(fp32, int8, images, images, min_agreement=0.0)
    return fp32, int8


def serving(args, ckpt: str, fp32: Path, files: list[Path], bodies: list[bytes], labels: list[str], tmp: Path) -> dict:
    """Steps 2 and 3 of the docstring, against `vision-lora serve --model fp32` (with `vision-lora test` first)."""
    from vision_lora.export import read_onnx_metadata

    result = {}
    result["vision_lora_test"] = vision_lora_test(ckpt, args.data)
    print("vision-lora test", result["vision_lora_test"], flush=True)

    runs = []
    b16_args = ["--model", str(fp32), "--max_batch_size", "16", "--batch_timeout_ms", "5"]
    b1_args = ["--model", str(fp32), "--max_batch_size", "1"]
    with server(*b16_args, log=tmp / "a.log") as (port, proc), server(*b1_args, log=tmp / "b.log") as (port1, p1):
        for p in (port, port1):
            load(p, bodies[:32], labels[:32], 4, 64, 30)  # warm-up
        for c in args.concurrency:
            memory = PeakMemory(proc.pid)
            figures = load(port, bodies, labels, c, args.requests, args.max_seconds)
            figures.update(memory.close())
            runs.append({"max_batch_size": 16, **figures})
            print(runs[-1], flush=True)
        memory, wrong = PeakMemory(proc.pid), set()
        long = load(port, bodies, labels, 16, args.long_requests, args.max_seconds * 10, wrong=wrong)
        long.update(memory.close())
        result["long_run"] = {"max_batch_size": 16, **long}
        print("long", result["long_run"], flush=True)
        # Every file is sent many times: the files ever answered wrongly must be exactly those `vision-lora test`
        # got wrong, and the accuracy per file the same.
        served_wrong = sorted(str(files[k].resolve()) for k in wrong)
        tested = result["vision_lora_test"]
        result["served_vs_test"] = {
            "files": len(files),
            "served_accuracy_per_file": round(1 - len(served_wrong) / len(files), 4),
            "test_accuracy": tested["test_acc"],
            "same_misclassified_files": served_wrong == tested["misclassified"],
        }
        print("served vs test", result["served_vs_test"], flush=True)
        # Batch 16 against batch 1 at 16 clients, in alternating rounds so that the machine's drift cancels.
        rounds = []
        for _ in range(max(1, args.rounds)):
            pair = [
                load(p, bodies, labels, 16, args.requests // 2, args.max_seconds, server_pid=pid)
                for p, pid in ((port, proc.pid), (port1, p1.pid))
            ]
            rounds.append(
                {
                    "batch16_req_per_s": pair[0]["req_per_s"],
                    "batch1_req_per_s": pair[1]["req_per_s"],
                    "batch16_mean_batch": pair[0]["mean_batch"],
                    "batch16_cpu_ms_per_request": pair[0]["cpu_ms_per_request"],
                    "batch1_cpu_ms_per_request": pair[1]["cpu_ms_per_request"],
                }
            )
            print("round", rounds[-1], flush=True)
        runs.append({"max_batch_size": 1, **pair[1]})
    result["load"] = runs
    result["batch_rounds_c16"] = rounds
    result["batch16_over_batch1_throughput_c16"] = round(
        statistics.median(r["batch16_req_per_s"] / r["batch1_req_per_s"] for r in rounds), 3
    )
    result["onnxruntime_cpu_ms_per_image"] = ort_cpu_per_image(fp32, read_onnx_metadata(fp32)["input_size"])
    print("onnxruntime CPU per image", result["onnxruntime_cpu_ms_per_image"], flush=True)
    b16 = next(r for r in runs if r["max_batch_size"] == 16 and r["concurrency"] == 16)
    result["p99_over_p50_c16"] = round(b16["p99_ms"] / b16["p50_ms"], 2)

    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", help="default: the newest runs/quickstart/version_*/checkpoints/best-*.ckpt")
    p.add_argument("--data", default=str(ROOT / "data/digits"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=540, help="requests per concurrency level")
    p.add_argument("--long_requests", type=int, default=10000, help="requests of the long run at concurrency 16")
    p.add_argument("--max_seconds", type=float, default=120, help="time limit of each load run")
    p.add_argument("--rounds", type=int, default=4, help="alternating batch-16 / batch-1 rounds at 16 clients")
    p.add_argument("--reps", type=int, default=40, help="onnxruntime latency repetitions at batch 1")
    p.add_argument("--skip_vit", action="store_true")
    p.add_argument("--int8_only", action="store_true", help="only step 1's export and step 4, merged into --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_load.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from vision_lora.cli import main as cli

    ckpt = args.ckpt_path or str(
        max(Path("runs/quickstart").glob("version_*/checkpoints/best-*.ckpt"), key=os.path.getmtime)
    )
    test = Path(args.data) / "test"
    files = sorted(test.rglob("*.png"))
    bodies, labels = [multipart(f.read_bytes()) for f in files], [f.parent.name for f in files]
    result = {
        "date": str(date.today()),
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "checkpoint": ckpt,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp_name:
        tmp = Path(tmp_name)
        int8 = tmp / "quickstart.onnx"
        fp32 = tmp / "quickstart.fp32.onnx"
        cli(
            [
                "export",
                "--ckpt_path",
                ckpt,
                "--output",
                str(int8),
                "--quantize",
                "int8",
                "--min_agreement",
                "0",
                f"--data.root={args.data}",
            ]
        )
        from vision_lora.export import labelled_images, load_model, read_onnx_metadata

        trained = load_model(ckpt_path=ckpt)
        paths, targets = labelled_images(test, trained.class_names)
        if args.int8_only:  # the serving figures of the last full run stay
            result = {**json.loads(Path(args.out).read_text()), "int8_command": result["command"]}
        else:
            result.update(serving(args, ckpt, fp32, files, bodies, labels, tmp))

        meta = read_onnx_metadata(int8)
        result["int8"] = [
            int8_figures("tf_efficientnet_lite0 (quickstart, 96 px)", fp32, int8, meta["input_size"], args.reps)
        ]
        result["int8_agreement_digits_test"] = _agreement(fp32, int8, trained, paths, targets)
        print(result["int8"][-1], result["int8_agreement_digits_test"], flush=True)
        if not args.skip_vit:
            vit_fp32, vit_i8 = vit_int8(tmp, Path(args.data) / "train")
            result["int8"].append(
                int8_figures("vit_small_patch16_224 (random)", vit_fp32, vit_i8, [3, 224, 224], max(10, args.reps // 4))
            )
            print(result["int8"][-1], flush=True)
    result["seconds"] = round(time.perf_counter() - started)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _agreement(fp32: Path, int8: Path, trained, paths, targets) -> dict:
    import onnxruntime as ort

    from vision_lora.export import preprocess_files

    x = preprocess_files(paths, trained.data_config).numpy()
    top1 = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        top1[name] = np.concatenate([s.run(None, {"input": x[i : i + 32]})[0] for i in range(0, len(x), 32)]).argmax(1)
    y = np.array(targets)
    return {
        "images": len(y),
        "agreement": round(float((top1["fp32"] == top1["int8"]).mean()), 4),
        "fp32_accuracy": round(float((top1["fp32"] == y).mean()), 4),
        "int8_accuracy": round(float((top1["int8"] == y).mean()), 4),
    }


if __name__ == "__main__":
    main()
