from __future__ import annotations

import importlib.util
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from PIL import ExifTags, Image
from timm.data import resolve_model_data_config

from vision_lora.callbacks import BadFileReport
from vision_lora.data import BadSample, ImageFolderDataModule, SkipBadCollate, load_rgb

REPO = Path(__file__).resolve().parents[1]
COLORS = {"bird": (30, 30, 200), "cat": (200, 30, 30), "dog": (30, 200, 30)}
# Plain settings that make a training batch predictable: no flips, jitter or crops, a 24 px input.
PLAIN = dict(num_workers=0, hflip=0.0, color_jitter=None, scale=(1.0, 1.0), ratio=(1.0, 1.0))
SIZE24 = {"input_size": 24}


def _write_class(folder: Path, color: tuple[int, int, int], count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # PNG and JPEG alternate; a 16x16 solid colour survives JPEG within a level or two.
        Image.new("RGB", (16, 16), color).save(folder / (f"{i}.png" if i % 2 == 0 else f"{i}.JPG"))


def _write_split(root: Path, split: str, count: int, colors: dict = COLORS) -> None:
    for name, color in colors.items():
        _write_class(root / split / name, color, count)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _write_split(root, "train", 6)
    _write_split(root, "val", 2)
    _write_split(root, "test", 2)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _drain(dm: ImageFolderDataModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = zip(*(dm.on_before_batch_transfer(batch, 0) for batch in loader), strict=True)
    return torch.cat(images), torch.cat(targets)


def _add_bad_files(folder: Path) -> list[Path]:
    empty, truncated, text = folder / "empty.png", folder / "truncated.jpg", folder / "text.jpg"
    empty.write_bytes(b"")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    text.write_text("this is not a JPEG")
    return [empty, truncated, text]


def test_class_map_and_counts(image_root):
    dm = ImageFolderDataModule(root=str(image_root), num_workers=0)
    assert dm.class_names == ["bird", "cat", "dog"]
    assert dm.num_classes == 3
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (18, 6)  # .DS_Store and notes.txt ignored
    dm.setup("test")
    assert len(dm.test_dataset) == 6
    train = dm.train_dataset
    labels = {Path(path).parent.name: label for path, label in zip(train.paths, train.labels, strict=True)}
    assert labels == {"bird": 0, "cat": 1, "dog": 2}
    assert np.bincount(dm.val_dataset.labels).tolist() == [2, 2, 2]


def test_split_without_val_is_stratified_and_seeded(tmp_path):
    root = tmp_path / "images"
    for name, count in (("a", 10), ("b", 6), ("c", 2), ("d", 1)):
        _write_class(root / "train" / name, (count * 20, 0, 0), count)

    def split(seed):
        dm = ImageFolderDataModule(root=str(root), val_fraction=0.2, seed=seed, num_workers=0)
        dm.setup("fit")
        return dm.train_dataset, dm.val_dataset

    train, val = split(0)
    assert np.bincount(val.labels, minlength=4).tolist() == [2, 1, 1, 0]  # round(0.2 n), at least 1, keep 1 train
    assert np.bincount(train.labels, minlength=4).tolist() == [8, 5, 1, 1]
    assert not set(train.paths) & set(val.paths)
    assert split(0)[1].paths == val.paths
    assert split(1)[1].paths != val.paths


def test_val_class_missing_from_train_is_named(image_root):
    _write_class(image_root / "val" / "fox", (1, 2, 3), 1)
    with pytest.raises(ValueError, match="val has class folder 'fox'"):
        ImageFolderDataModule(root=str(image_root))


def test_test_class_missing_from_train_is_named(image_root):
    _write_class(image_root / "test" / "fox", (1, 2, 3), 1)
    with pytest.raises(ValueError, match="test has class folder 'fox'"):
        ImageFolderDataModule(root=str(image_root))


def test_one_class_train_raises(tmp_path):
    _write_class(tmp_path / "train" / "only", (5, 5, 5), 3)
    with pytest.raises(ValueError, match="at least two"):
        ImageFolderDataModule(root=str(tmp_path))


def test_missing_root_and_empty_train_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train"))):
        ImageFolderDataModule(root=str(tmp_path))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="No images in"):
        ImageFolderDataModule(root=str(tmp_path))


def test_empty_class_warns_and_stays_in_the_map(image_root):
    (image_root / "train" / "eel").mkdir()
    with pytest.warns(UserWarning, match="eel has no images"):
        dm = ImageFolderDataModule(root=str(image_root))
    assert dm.class_names == ["bird", "cat", "dog", "eel"]


def test_hidden_folders_and_files_are_ignored(image_root):
    _write_class(image_root / "train" / ".thumbnails", (0, 0, 0), 2)
    _write_class(image_root / "train" / "cat" / ".cache", (0, 0, 0), 2)
    (image_root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble file
    dm = ImageFolderDataModule(root=str(image_root), num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ["bird", "cat", "dog"]
    assert len(dm.train_dataset) == 18


def test_class_names_with_spaces_and_non_ascii(tmp_path):
    colors = {"chat noir": (10, 10, 10), "café": (100, 60, 20), "狗": (240, 240, 240)}
    _write_split(tmp_path, "train", 2, colors)
    _write_split(tmp_path, "val", 1, colors)
    dm = ImageFolderDataModule(root=str(tmp_path), preprocess=SIZE24, **PLAIN)
    dm.setup("fit")
    assert dm.class_names == sorted(colors)
    images, targets = _drain(dm, dm.val_dataloader())
    assert sorted(targets.tolist()) == [0, 1, 2]
    assert images.shape == (3, 3, 24, 24)


def _saved(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _pixels(path: Path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_load_rgb_grayscale_16bit_scales_instead_of_clipping(tmp_path):
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    path = _saved(tmp_path, Image.fromarray(values), "deep.png")
    assert Image.open(path).mode in ("I;16", "I")
    assert _pixels(path)[0, :, 0].tolist() == [0, 128, 255, 1]
    as_int32 = _saved(tmp_path, Image.fromarray(values.astype(np.int32)), "deep.tif")  # mode "I"
    assert Image.open(as_int32).mode == "I"
    assert _pixels(as_int32)[0, :, 0].tolist() == [0, 128, 255, 1]


def test_load_rgb_alpha_is_composited_on_white(tmp_path):
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8))
    assert _pixels(_saved(tmp_path, rgba, "rgba.png"))[0].tolist() == [[255, 255, 255], [255, 0, 0], [127, 127, 127]]
    la = Image.fromarray(np.array([[[40, 0], [40, 255]]], dtype=np.uint8), mode="LA")
    assert _pixels(_saved(tmp_path, la, "la.png"))[0].tolist() == [[255, 255, 255], [40, 40, 40]]


def test_load_rgb_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    opaque = _saved(tmp_path, palette, "opaque.png")
    assert _pixels(opaque)[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    for name in ("clear.png", "clear.gif"):
        clear = _saved(tmp_path, palette, name, transparency=0)
        assert _pixels(clear)[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_load_rgb_cmyk_one_bit_and_grayscale(tmp_path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    assert _pixels(_saved(tmp_path, cmyk, "cmyk.tif"))[0].tolist() == [[255, 255, 255], [255, 0, 0]]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    assert _pixels(_saved(tmp_path, bits, "bits.png"))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    gray = Image.new("L", (1, 1), 100)
    assert _pixels(_saved(tmp_path, gray, "gray.bmp"))[0].tolist() == [[100, 100, 100]]


@pytest.mark.parametrize(("orientation", "top_color"), [(6, "red"), (8, "blue")])
def test_load_rgb_applies_exif_orientation(tmp_path, orientation, top_color):
    stored = np.zeros((32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high: left half red, right half blue
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    upright = _pixels(_saved(tmp_path, Image.fromarray(stored), "photo.jpg", exif=exif, quality=95))
    assert upright.shape == (64, 32, 3)
    # 6: the camera was turned clockwise, so the stored left edge is the top; 8: the other way round.
    top, bottom = upright[8, 16].astype(int), upright[56, 16].astype(int)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    expected_top, expected_bottom = (red, blue) if top_color == "red" else (blue, red)
    assert np.abs(top - expected_top).max() < 8 and np.abs(bottom - expected_bottom).max() < 8


def test_train_batch_has_configured_size_and_normalisation(image_root):
    config = {"input_size": 24, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    dm = ImageFolderDataModule(root=str(image_root), preprocess=config, **PLAIN)
    dm.setup("fit")
    assert dm.data_config["input_size"] == (3, 24, 24)
    assert dm.data_config["mean"] == (0.5, 0.5, 0.5)
    images, targets = _drain(dm, dm.train_dataloader())
    assert images.shape == (18, 3, 24, 24) and images.dtype == torch.float32
    assert targets.dtype == torch.long and np.bincount(targets).tolist() == [6, 6, 6]
    colors = torch.tensor([COLORS[name] for name in dm.class_names], dtype=torch.float32)[targets]  # (18, 3)
    expected = (colors / 255 - 0.5) / 0.25
    torch.testing.assert_close(images.mean(dim=(2, 3)), expected, atol=3 / 255 / 0.25, rtol=0)


def test_data_config_from_model_name_matches_timm(image_root):
    dm = ImageFolderDataModule(root=str(image_root), model_name="test_vit", num_workers=0)
    dm.setup("validate")
    expected = resolve_model_data_config(timm.create_model("test_vit", pretrained=False))
    assert dm.data_config == expected
    images, _ = _drain(dm, dm.val_dataloader())
    assert images.shape == (6, 3, 160, 160)
    # test_vit normalises with mean = std = 0.5: the red channel of the cats, level 200, becomes 200 / 255 * 2 - 1.
    torch.testing.assert_close(images[2:4, 0].mean(), torch.tensor(200 / 255 * 2 - 1), atol=0.02, rtol=0)


def test_attached_model_owns_the_preprocessing_and_standalone_overrides_apply(image_root):
    model_config = {"input_size": (3, 64, 64), "mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0}
    model_config["interpolation"] = "bilinear"
    dm = ImageFolderDataModule(root=str(image_root), model_name="test_vit", num_workers=0)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(data_config=model_config))
    dm.setup("validate")
    assert dm.data_config == model_config
    assert dm.eval_transform()(Image.new("RGB", (16, 16))).shape == (3, 64, 64)
    standalone = ImageFolderDataModule(root=str(image_root), model_name="test_vit", preprocess={"input_size": 40})
    standalone.setup("validate")
    assert standalone.data_config["input_size"] == (3, 40, 40) and standalone.data_config["mean"] == (0.5, 0.5, 0.5)
    standalone.trainer = dm.trainer  # overrides and a model that owns the preprocessing: one must go
    with pytest.raises(ValueError, match="model owns the preprocessing"):
        standalone.setup("validate")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_skipped_counted_and_reported(image_root, caplog, num_workers):
    bad = _add_bad_files(image_root / "train" / "dog")
    settings = {**PLAIN, "num_workers": num_workers}
    dm = ImageFolderDataModule(root=str(image_root), batch_size=4, max_bad_fraction=0.2, preprocess=SIZE24, **settings)
    dm.setup("fit")
    assert len(dm.train_dataset) == 21
    images, targets = _drain(dm, dm.train_dataloader())
    assert images.shape[0] == targets.shape[0] == 18
    with caplog.at_level(logging.WARNING, logger="vision_lora.data"):
        dm.report_bad_files("train")
    assert "Skipped 3 of 21 train images" in caplog.text
    assert all(str(path) in caplog.text for path in bad)
    caplog.clear()
    dm.report_bad_files("train")  # counts were reset
    assert caplog.text == ""


def test_report_bad_files_raises_over_max_bad_fraction(image_root):
    _add_bad_files(image_root / "val" / "dog")
    dm = ImageFolderDataModule(root=str(image_root), max_bad_fraction=0.25, preprocess=SIZE24, **PLAIN)
    dm.setup("validate")
    _drain(dm, dm.val_dataloader())
    with pytest.raises(ValueError, match=r"(?s)3 of 9 val images \(33.3%\).*max_bad_fraction=0.25"):
        dm.report_bad_files("val")


class _ShapeProbe(L.LightningModule):
    """A linear model on channel means that records the batches it is handed."""

    data_config = {
        "input_size": (3, 20, 20),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 3)
        self.batches = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.batches.append((tuple(images.shape), targets.dtype))
        return F.cross_entropy(self.head(images.mean(dim=(2, 3))), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_uses_the_model_data_config_and_strips_bad_files_with_workers(image_root, caplog):
    _add_bad_files(image_root / "train" / "dog")
    dm = ImageFolderDataModule(root=str(image_root), batch_size=8, num_workers=2, max_bad_fraction=0.2)
    model = _ShapeProbe()
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[BadFileReport()])
    with caplog.at_level(logging.WARNING, logger="vision_lora.data"):
        trainer.fit(model, datamodule=dm)
    assert dm.data_config["input_size"] == (3, 20, 20)
    assert sum(shape[0] for shape, _ in model.batches) == 18
    assert all(shape[1:] == (3, 20, 20) and dtype == torch.long for shape, dtype in model.batches)
    assert "Skipped 3 of 21 train images" in caplog.text


def test_all_bad_batch_becomes_an_empty_batch(image_root):
    collate = SkipBadCollate("train", (3, 24, 24))
    images, targets = ImageFolderDataModule(root=str(image_root)).on_before_batch_transfer(
        collate([BadSample("a.png"), BadSample("b.jpg")]), 0
    )
    assert images.shape == (0, 3, 24, 24) and targets.shape == (0,) and targets.dtype == torch.long


def test_fail_policy_raises_with_the_path(image_root):
    _, truncated, _ = _add_bad_files(image_root / "train" / "dog")
    dm = ImageFolderDataModule(root=str(image_root), bad_files="fail", preprocess=SIZE24, **PLAIN)
    dm.setup("fit")
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        dm.train_dataset[dm.train_dataset.paths.index(str(truncated))]


def test_predict_batches_carry_paths(image_root, tmp_path):
    folder = tmp_path / "unlabelled"
    _write_class(folder, (1, 2, 3), 2)
    _write_class(folder / "nested", (4, 5, 6), 1)
    (folder / "notes.txt").write_text("ignored")
    dm = ImageFolderDataModule(root=str(image_root), predict_dir=str(folder), preprocess=SIZE24, **PLAIN)
    dm.setup("predict")
    images, paths = dm.on_before_batch_transfer(next(iter(dm.predict_dataloader())), 0)
    assert images.shape == (3, 3, 24, 24)
    assert paths == sorted(str(p) for p in (folder / "0.png", folder / "1.JPG", folder / "nested" / "0.png"))


def test_test_and_predict_need_their_folders(image_root):
    shutil.rmtree(image_root / "test")
    dm = ImageFolderDataModule(root=str(image_root), num_workers=0)
    with pytest.raises(FileNotFoundError, match="test"):
        dm.setup("test")
    with pytest.raises(ValueError, match="predict_dir"):
        dm.setup("predict")


def test_make_digits_writes_the_stratified_split(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    spec = importlib.util.spec_from_file_location("make_digits", REPO / "data" / "make_digits.py")
    make_digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_digits)
    counts = make_digits.make_digits(tmp_path / "digits", seed=0)
    assert counts == {"train": 1257, "val": 270, "test": 270}
    digits = load_digits()
    (first,) = (tmp_path / "digits").glob("*/*/0.png")
    assert first.parent.name == str(digits.target[0])
    expected = np.round(digits.images[0] * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
    assert np.array_equal(np.asarray(Image.open(first)), expected)

    for root in (tmp_path / "digits", REPO / "data" / "digits"):
        dm = ImageFolderDataModule(root=str(root), num_workers=0)
        assert dm.class_names == [str(d) for d in range(10)]
        dm.setup("fit")
        dm.setup("test")
        sizes = (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset))
        assert sizes == (1257, 270, 270)
        assert np.bincount(dm.val_dataset.labels).min() >= 26  # stratified: 27 +- 1 per class
