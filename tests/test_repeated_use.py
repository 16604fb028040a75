"""Notebooks call `main([...])` many times in one process: nothing may pile up from call to call."""

from __future__ import annotations

import gc
import threading

import psutil
import pytest
from helpers import FAST

from vision_lora.cli import main


def _resources() -> dict[str, float]:
    gc.collect()
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": threading.active_count(),
        "os_threads": me.num_threads(),
        "children": len(me.children(recursive=True)),
        "rss_mb": me.memory_info().rss / 2**20,
    }


@pytest.mark.slow
def test_twenty_fit_and_test_calls_in_one_process_leak_nothing(image_folder, backbone_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [*FAST, f"--data.root={image_folder}", "--data.num_workers=2"]
    seen = []
    for call in range(1, 21):
        name = f"--trainer.logger.init_args.name=call{call}"
        main(["fit", *common, f"--model.weights={backbone_file('test_resnet')}", "--trainer.max_epochs=1", name])
        ckpt = tmp_path / "runs" / f"call{call}" / "version_0" / "checkpoints" / "last.ckpt"
        main(["test", *common, f"--ckpt_path={ckpt}"])
        seen.append(_resources())
        print(call, seen[-1])
    fifth, last = seen[4], seen[19]
    assert last["children"] == 0, "loader worker processes are left running"
    assert last["fds"] <= fifth["fds"], (fifth, last)
    assert last["threads"] <= fifth["threads"] and last["os_threads"] <= fifth["os_threads"], (fifth, last)
    assert last["rss_mb"] - fifth["rss_mb"] < 50, (fifth, last)
