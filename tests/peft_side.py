"""The PEFT side of the format round trips, run as a subprocess that imports timm, torch and peft, never vision_lora.

`python peft_side.py jobs.json`: each job builds `timm.create_model(model, num_classes=N)` with the base weights of
the file `base`, then either loads a PEFT adapter dir (`"load"`) or makes one with `peft.get_peft_model` and random
adapter values (`"make"`), and writes the logits on the inputs of `x` (unmerged and merged) to `out`.
"""

from __future__ import annotations

import json
import sys

import timm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file


def _base(job: dict) -> torch.nn.Module:
    model = timm.create_model(job["model"], num_classes=job["num_classes"], **job.get("kwargs", {}))
    model.load_state_dict(load_file(job["base"]))
    return model.eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def main(path: str) -> None:
    for job in json.loads(open(path).read()):
        torch.manual_seed(0)
        x = load_file(job["x"])["x"]
        if job["mode"] == "load":
            model = PeftModel.from_pretrained(_base(job), job["adapter"]).eval()
        else:
            model = get_peft_model(_base(job), LoraConfig(**job["config"])).eval()
            _randomize(model, job.get("seed", 0))
            model.save_pretrained(job["adapter"])
        with torch.no_grad():
            logits = model(x)
            merged = model.merge_and_unload()(x)
        save_file({"logits": logits.contiguous(), "merged": merged.contiguous()}, job["out"])
    assert not any(m.startswith("vision_lora") for m in sys.modules), "the PEFT side imported vision_lora"


if __name__ == "__main__":
    main(sys.argv[1])
