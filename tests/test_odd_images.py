"""Odd images a folder scraped from the web holds: each is used (converted) or skipped and reported, and the run
goes on. Real files of each kind, written here."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import torch
from helpers import FAST
from PIL import Image

from vision_lora.cli import main
from vision_lora.data import ImageFolderDataModule, load_rgb

NON_UTF8 = os.fsdecode(b"caf\xe9-latin1.png")  # a Latin-1 file name: not valid UTF-8


def _odd_files(folder: Path) -> dict[str, tuple[int, int, int] | None]:
    """Write one file of each odd kind into `folder`; return name -> expected RGB of its centre (None: any)."""
    folder.mkdir(parents=True, exist_ok=True)
    red = (200, 30, 30)
    Image.new("RGB", (1, 1), red).save(folder / "one_pixel.png")
    Image.new("RGB", (10_000, 1), red).save(folder / "banner.png")
    Image.new("RGB", (1, 10_000), red).save(folder / "tower.jpg", quality=95)
    gray16 = np.full((40, 40), 50_000, np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    Image.fromarray(gray16).save(folder / "gray16.tif")
    frames = [Image.new("P", (30, 30), i) for i in (1, 2, 3)]
    frames[0].putpalette([0, 0, 0, *red, 0, 255, 0, 0, 0, 255] + [0] * 756)
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (30, 30), red).save(
        folder / "pages.tif", save_all=True, append_images=[Image.new("RGB", (30, 30))]
    )
    Image.new("CMYK", (30, 30), (0, 255, 255, 40)).save(folder / "cmyk.jpg")
    Image.new("LAB", (30, 30), (50, 60, 40)).save(folder / "lab.tif")
    Image.new("RGB", (30, 30), red).save(folder / "really_a_png.jpg", format="PNG")
    bad_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"
    Image.new("RGB", (30, 20), red).save(folder / "bad_exif.jpg", exif=bad_exif)
    Image.new("RGB", (30, 30), red).save(os.path.join(os.fsencode(folder), os.fsencode(NON_UTF8)))
    (folder / "loop").symlink_to("..", target_is_directory=True)  # a symlink loop in the tree
    return {
        "one_pixel.png": red,
        "banner.png": red,
        "tower.jpg": red,
        "gray16.png": (194, 194, 194),  # 50,000 / 65,535 of the range, not clipped to white
        "gray16.tif": (194, 194, 194),
        "animated.gif": red,  # the first frame
        "pages.tif": red,
        "cmyk.jpg": None,
        "lab.tif": None,
        "really_a_png.jpg": red,
        "bad_exif.jpg": red,
        NON_UTF8: red,
    }


def test_every_odd_image_decodes_to_rgb(tmp_path):
    expected = _odd_files(tmp_path / "odd")
    for name, colour in expected.items():
        image = load_rgb(os.path.join(tmp_path / "odd", name))
        assert image.mode == "RGB", name
        if colour is not None:
            centre = np.asarray(image)[image.height // 2, image.width // 2]
            assert np.abs(centre.astype(int) - colour).max() <= 8, (name, centre)


def test_odd_images_train_validate_and_predict(image_folder, tmp_path, monkeypatch, caplog):
    expected = _odd_files(image_folder / "train" / "green")
    _odd_files(image_folder / "val" / "green")
    (image_folder / "train" / "green" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not much of a JPEG")
    dm = ImageFolderDataModule(root=str(image_folder), preprocess={"input_size": 32}, num_workers=0, batch_size=8)
    dm.setup("fit")
    keys = [os.path.basename(k) for k in dm.train_dataset.paths]
    assert sorted(k for k in keys if k in expected or k.startswith("caf")) == sorted(expected)  # the loop: once
    for split in ("train", "val"):
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        for batch in loader:
            images, _ = dm.on_before_batch_transfer(batch, 0)
            assert images.shape[1:] == (3, 32, 32) and torch.isfinite(images).all()
        with caplog.at_level(logging.WARNING):
            dm.report_bad_files(split)
    assert "truncated.jpg" in caplog.text and "Skipped 1 of" in caplog.text  # the one unreadable file, by path

    monkeypatch.chdir(tmp_path)
    main(["fit", *FAST, f"--data.root={image_folder}", "--trainer.max_epochs=1", "--data.max_bad_fraction=0.2"])
    ckpt = next(Path("runs").rglob("best-*.ckpt"))
    main(["predict", *FAST, f"--ckpt_path={ckpt}", f"--data.predict_dir={image_folder / 'val' / 'green'}"])
    (predictions,) = Path("runs").rglob("predictions*.csv")
    with open(predictions, newline="", encoding="utf-8") as f:
        names = {os.path.basename(row["path"]) for row in csv.DictReader(f)}
    assert set(expected) - {NON_UTF8} <= names and "caf\\xe9-latin1.png" in names
