"""Write tests/families.json: the models the family sweep (tests/test_families.py) runs, one line per choice.

For every model module of timm (`timm.list_modules()`): its smallest model by parameter count, plus the smallest model
of every further attention variant the module defines (attention class x q/k/v layout: maxxvit's head-first `_rw`
and `tf_` models differ). Parameter counts and structure come from models built on the meta device (no memory, no
weights). Run after upgrading timm:  PYTHONPATH=. python tests/make_families.py
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

from vision_lora.lora.targets import _attention_projections, _class_key, qkv_layout

OUT = Path(__file__).with_name("families.json")


def attention_variants(model: torch.nn.Module) -> set[str]:
    """'<attention class>:<layout>' for every attention input projection: layout 'thirds', 'per-head' or 'whole'."""
    modules = dict(model.named_modules())
    out = set()
    for name, owner in _attention_projections(model).items():
        layout = qkv_layout(model, name)
        kind = "whole" if layout is None else "thirds" if layout.is_thirds else "per-head"
        out.add(f"{_class_key(modules[owner])}:{kind}")
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    start = time.time()
    chosen, failed = [], {}
    for module in timm.list_modules():
        infos = []
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception as err:  # noqa: BLE001 - recorded, the sweep lists it
                failed[name] = f"{type(err).__name__}: {err}"[:160]
                continue
            infos.append(
                {
                    "module": module,
                    "model": name,
                    "params": sum(p.numel() for p in model.parameters()),
                    "input_size": list(model.pretrained_cfg.get("input_size", (3, 224, 224))),
                    "variants": sorted(attention_variants(model)),
                }
            )
        if not infos:
            continue
        infos.sort(key=lambda i: (i["params"], i["model"]))
        covered = set(infos[0]["variants"])
        chosen.append({**infos[0], "why": "smallest"})
        for info in infos[1:]:
            new = set(info["variants"]) - covered
            if new:
                covered |= new
                chosen.append({**info, "why": "attention " + ", ".join(sorted(new))})
        print(f"{module}: {len(infos)} models", file=sys.stderr)
    data = {"timm": timm.__version__, "models": chosen, "failed_on_meta": failed}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(chosen)} models, {len(failed)} failed, {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
