"""Write scikit-learn's 1,797 handwritten 8x8 digits as grayscale PNG files in ImageFolder layout.

    python data/make_digits.py --out data/digits --seed 0

gives `out/{train,val,test}/<digit>/<index>.png`, a stratified 70 / 15 / 15 split, where `<index>` is the sample's
position in `sklearn.datasets.load_digits()`. The images stay 8x8; the training transforms upsample them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLITS = ("train", "val", "test")


def make_digits(out: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, int]:
    """Write the digits under `out` and return the number of images per split.

    Raises:
        FileExistsError: `out` already holds a split folder and `overwrite` is False.
    """
    out = Path(out)
    existing = [out / split for split in SPLITS if (out / split).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace the splits under {out}.")
    for path in existing:
        shutil.rmtree(path)

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), ink is bright
    labels = digits.target
    indices = np.arange(len(labels))
    train, rest = train_test_split(indices, test_size=0.3, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)

    counts = {}
    for split, split_indices in zip(SPLITS, (train, val, test), strict=True):
        for index in split_indices:
            folder = out / split / str(labels[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[index]).save(folder / f"{index}.png")  # uint8 (8, 8) gives mode "L"
        counts[split] = len(split_indices)
    return counts


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits", help="folder to write train/, val/ and test/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--overwrite", action="store_true", help="replace existing split folders under --out")
    parsed = parser.parse_args(args)
    try:
        counts = make_digits(parsed.out, seed=parsed.seed, overwrite=parsed.overwrite)
    except FileExistsError as err:
        parser.error(str(err))
    for split, count in counts.items():
        print(f"{split}: {count} images")
    print(f"total: {sum(counts.values())} images in {parsed.out}")


if __name__ == "__main__":
    main()
