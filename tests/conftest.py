from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


# Three easy classes: a square of a different colour on a noisy 32×32 image (names with a space and non-ASCII).
_COLOURS = {"red square": (230, 20, 20), "green": (20, 230, 20), "blue ünïcode": (20, 20, 230)}


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Write `root/<split>/<class>/<i>.png` for the splits and counts in `per_class` ({"train": 8, ...})."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name, colour in _COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                y, x = rng.integers(0, 16, 2)
                img[y : y + 16, x : x + 16] = colour
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", {"train": 12, "val": 4, "test": 4})


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory):
    """A "pretrained" backbone as a local weights file (random values, but the same in every process)."""
    import timm

    def make(name: str) -> str:
        path = tmp_path_factory.getbasetemp() / f"{name}.pth"
        if not path.exists():
            torch.manual_seed(123)
            torch.save(timm.create_model(name).state_dict(), path)
        return str(path)

    return make
