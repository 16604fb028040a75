"""What a benchmark JSON records about the machine it ran on: CPU model and SIMD flags, cores, torch version and
threads (`python benchmarks/_machine.py` prints it). Every benchmark script can import it (a script runs with
`benchmarks/` on `sys.path`):

    from _machine import machine_info
    results = {"machine": machine_info(threads=args.threads), ...}
"""

from __future__ import annotations

import os
import platform

__all__ = ["CPU_FLAGS", "machine_info"]

# The flags that decide which GEMM / conv kernels oneDNN and MKL can use on an x86 CPU.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", empty set) where there is none (not Linux)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def machine_info(threads: int | None = None) -> dict:
    """The machine, as a JSON-ready dict: cpu model, presence of each of `CPU_FLAGS`, logical CPUs, platform, Python
    and torch versions, and the torch thread count (`threads` when the benchmark sets it in its child processes, else
    this process's)."""
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu": model or platform.processor(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
    }


def main() -> None:
    import argparse
    import json

    argparse.ArgumentParser(description="Print what benchmark JSON records about this machine.").parse_args()
    print(json.dumps(machine_info(), indent=2))


if __name__ == "__main__":
    main()
