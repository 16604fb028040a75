"""Reduced-scale decoding, optimized (LitData) datasets, and exact epochs across processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli_command, cli_env, run_named, start_named
from PIL import Image
from timm.data import create_transform

from vision_lora import LoRAClassifier
from vision_lora.cli import main
from vision_lora.data import FolderSource, ImageFolderDataModule, ImagePipeline, load_rgb, optimize_folder, read_info
from vision_lora.data.decode import _oriented_size, open_image

HERE = Path(__file__).parent
REPO = HERE.parent


def _photo(width: int = 1600, height: int = 1200, orientation: int | None = None) -> bytes:
    """A real photo (scikit-image's astronaut) at camera-like size, as JPEG bytes."""
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _bomb_png(path: Path, side: int = 30_000) -> None:
    """A 30,000 × 30,000 one-bit PNG: 110 KB on disk, 900 megapixels decoded."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + side // 8)
    compressor, body = zlib.compressobj(9), []
    for _ in range(side):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")
    )


def _train_transform(size: int = 224, scale=(0.5, 1.0)):
    return create_transform(input_size=(3, size, size), is_training=True, scale=scale, hflip=0.0, color_jitter=None)


def _both(pipeline_fast, pipeline_full, source, seed: int):
    random.seed(seed)
    fast = pipeline_fast(source)
    random.seed(seed)
    return fast, pipeline_full(source)


def test_reduced_scale_decoding_gives_the_same_shape_and_nearly_the_same_pixels():
    photo = _photo()
    transform = _train_transform()
    fast, full = ImagePipeline(transform), ImagePipeline(transform, reduce=False)
    for seed in range(4):
        a, b = _both(fast, full, photo, seed)
        assert a.shape == b.shape == (3, 224, 224)
        # Tolerance, in normalised units (1/255 of the range is about 0.017): mean error under a quarter of a
        # grey level in these units, no pixel more than ~10 levels off (antialiasing of DCT vs. resize).
        assert (a - b).abs().mean() < 0.03 and (a - b).abs().max() < 0.6
    random.seed(0)
    timm_full = transform(load_rgb(photo))  # the plain timm path, full decode
    random.seed(0)
    torch.testing.assert_close(full(photo), timm_full, rtol=0, atol=0)
    eval_transform = create_transform(input_size=(3, 224, 224), is_training=False, crop_pct=0.875)
    a, b = ImagePipeline(eval_transform)(photo), eval_transform(load_rgb(photo))
    assert a.shape == b.shape and (a - b).abs().mean() < 0.03


def test_reduced_scale_decoding_is_not_used_where_the_crop_needs_full_resolution():
    photo = _photo()
    # A crop of ~1% of a 1600x1200 photo is ~140 px wide: a 224 px input needs every pixel of it.
    transform = _train_transform(scale=(0.01, 0.01))
    a, b = _both(ImagePipeline(transform), ImagePipeline(transform, reduce=False), photo, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # An eval resize to 1200 px (crop_pct 0.2 of 240 px) needs the full 1200 px short side too.
    eval_transform = create_transform(input_size=(3, 240, 240), is_training=False, crop_pct=0.2)
    torch.testing.assert_close(ImagePipeline(eval_transform)(photo), eval_transform(load_rgb(photo)), rtol=0, atol=0)


def test_reduced_scale_decoding_accounts_for_exif_rotation():
    upright, rotated = _photo(1600, 1200), _photo(1600, 1200, orientation=6)  # 6: display rotated by 90 degrees
    with open_image(rotated) as image:
        assert image.size == (1600, 1200) and _oriented_size(image) == (1200, 1600)
    transform = _train_transform()
    for source in (upright, rotated):
        a, b = _both(ImagePipeline(transform), ImagePipeline(transform, reduce=False), source, seed=5)
        assert (a - b).abs().mean() < 0.03


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb)
    assert bomb.stat().st_size < 2_000_000
    start = time.perf_counter()
    with pytest.raises(Exception, match="(?i)decompression bomb|exceeds limit"):
        load_rgb(bomb)
    assert time.perf_counter() - start < 1.0


def test_optimize_writes_splits_skips_bad_files_and_reruns_as_a_no_op(image_folder, tmp_path):
    (image_folder / "train" / "green" / "truncated.jpg").write_bytes(_photo(64, 48)[:200])
    _bomb_png(image_folder / "train" / "green" / "bomb.png")
    (image_folder / "train" / "green" / "big.jpg").write_bytes(_photo(1600, 1200))
    out = tmp_path / "optimized"
    report = optimize_folder(FolderSource(image_folder), out, max_side=256, num_workers=2)
    assert report.counts == {"train": 37, "val": 12, "test": 12}
    assert sorted(key for key, _ in report.bad_files) == ["train/green/bomb.png", "train/green/truncated.jpg"]
    info = read_info(str(out))
    assert info["class_names"] == FolderSource(image_folder).class_names and info["counts"] == report.counts
    dm = ImageFolderDataModule(root=str(out), preprocess={"input_size": 32}, num_workers=0, batch_size=64)
    dm.setup("fit")
    item = dm.train_dataset[0]
    assert item[0].shape == (3, 32, 32)
    keys = [dm.train_dataset[i][2] for i in range(len(dm.train_dataset))]
    assert "train/green/big.jpg" in keys and len(set(keys)) == 37
    big = dm.train_dataset[keys.index("train/green/big.jpg")]
    assert big[1] == dm.class_names.index("green")

    mtime = (out / "vision_lora_dataset.json").stat().st_mtime_ns
    assert optimize_folder(FolderSource(image_folder), out, max_side=256).up_to_date
    assert (out / "vision_lora_dataset.json").stat().st_mtime_ns == mtime
    (image_folder / "train" / "green" / "big.jpg").unlink()  # a changed folder is rewritten
    report = optimize_folder(FolderSource(image_folder), out, max_side=256, num_workers=1)
    assert not report.up_to_date and report.counts["train"] == 36


def test_optimized_dataset_and_its_folder_give_the_same_classes_and_val_accuracy(image_folder, tmp_path, backbone_file):
    out = tmp_path / "optimized"
    optimize_folder(FolderSource(image_folder), out, num_workers=1)
    model = LoRAClassifier("test_resnet", weights=backbone_file("test_resnet"), num_classes=3, input_size=32)
    import lightning as L

    results = {}
    for name, root in (("folder", image_folder), ("optimized", out)):
        dm = ImageFolderDataModule(root=str(root), num_workers=0, batch_size=5)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        results[name] = (dm.class_names, trainer.validate(model, datamodule=dm, verbose=False)[0])
    assert results["folder"][0] == results["optimized"][0]
    for key in ("val_acc", "val_loss"):
        torch.testing.assert_close(results["optimized"][1][key], results["folder"][1][key], rtol=0, atol=1e-6)


def test_bad_optimized_datasets_get_one_line_errors(image_folder, tmp_path):
    out = tmp_path / "optimized"
    optimize_folder(FolderSource(image_folder), out, num_workers=1)
    chunk = next((out / "train").glob("*.bin"))
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="instead of"):
        ImageFolderDataModule(root=str(out))
    chunk.unlink()
    with pytest.raises(ValueError, match="is missing"):
        ImageFolderDataModule(root=str(out))
    (out / ".vision_lora_optimizing").write_text("")  # as an interrupted optimize leaves it
    with pytest.raises(ValueError, match="incomplete optimized dataset"):
        ImageFolderDataModule(root=str(out))
    optimize_folder(FolderSource(image_folder), out, num_workers=1)  # rerun: rebuilt, complete
    assert ImageFolderDataModule(root=str(out)).num_classes == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "chunk-0-0.bin").write_bytes(b"someone else's data")
    with pytest.raises(ValueError, match="not empty and holds no vision-lora optimized dataset"):
        optimize_folder(FolderSource(image_folder), foreign, num_workers=1)
    assert (foreign / "chunk-0-0.bin").read_bytes() == b"someone else's data"


def test_remote_uri_streams_and_missing_credentials_fail_fast(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "optimized"
    optimize_folder(FolderSource(image_folder), out, num_workers=1)
    dm = ImageFolderDataModule(root=f"local:{out}", preprocess={"input_size": 32}, num_workers=0, batch_size=64)
    dm.setup("validate")
    images, labels = dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert images.shape == (12, 3, 32, 32) and sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="No AWS credentials found.*AWS_ACCESS_KEY_ID"):
        ImageFolderDataModule(root="s3://some-bucket/pets")
    assert time.perf_counter() - start < 10


def test_optimize_fit_test_export_on_the_digits_through_thecli_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["optimize", f"--data.root={REPO / 'data' / 'digits'}", "--output=digits_opt", "--num_workers=2"])
    assert read_info("digits_opt")["counts"] == {"train": 1257, "val": 270, "test": 270}
    common = [*FAST, "--data.root=digits_opt", "--data.batch_size=64"]
    main(["fit", *common, "--trainer.max_epochs=1", "--model.lr=0.02"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    main(["test", *common, f"--ckpt_path={best}"])
    (matrix_csv,) = [p for p in (tmp_path / "runs").rglob("confusion_matrix.csv") if "test" in p.parts]
    matrix = matrix_csv.read_text(encoding="utf-8").splitlines()
    assert matrix[0].split(",")[1:] == [str(d) for d in range(10)]
    assert sum(int(v) for row in matrix[1:] for v in row.split(",")[1:]) == 270
    main(["export", f"--ckpt_path={best}", "--output=digits.onnx", f"--verify_dir={REPO / 'data/digits/test/3'}"])
    assert Path("digits.onnx").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "optimized"])
def test_ddp_sees_every_training_sample_once_per_epoch_and_validates_each_val_sample_once(
    source, image_folder, tmp_path
):
    (image_folder / "train" / "green" / "extra.png").write_bytes(
        (image_folder / "train" / "green" / "0.png").read_bytes()
    )
    root = image_folder
    if source == "optimized":
        root = tmp_path / "optimized"
        optimize_folder(FolderSource(image_folder), root, num_workers=1)
    command = cli_command(
        "fit", *FAST, f"--data.root={root}", "--data.batch_size=4", "--trainer.max_epochs=2", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.callbacks+=helpers.RecordKeys",
    )  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"keys-rank{r}.json").read_text()) for r in (0, 1)]
    folder = FolderSource(image_folder)
    train_keys = {os.path.relpath(p, image_folder) for p in folder.samples("train")[0]}
    val_keys = {os.path.relpath(p, image_folder) for p in folder.samples("val")[0]}
    if source == "folder":
        train_keys, val_keys = {str(image_folder / k) for k in train_keys}, {str(image_folder / k) for k in val_keys}
    assert len(train_keys) == 37
    # Ranks must take equal steps, so a few samples sit out each epoch (a different few each time) rather than some
    # being trained on twice: the image-folder sampler leaves out 37 % 2 = 1; LitData's drop_last trims each
    # epoch to whole batches on every rank, 37 // (2 ranks * 4) * 8 = 32.
    expected = 36 if source == "folder" else 32
    for epoch in (0, 1):
        seen = ranks[0][f"train{epoch}"] + ranks[1][f"train{epoch}"]
        assert len(seen) == len(set(seen)) == expected and set(seen) <= train_keys
        assert len(ranks[0][f"train{epoch}"]) == len(ranks[1][f"train{epoch}"])
        val = ranks[0][f"val{epoch}"] + ranks[1][f"val{epoch}"]
        assert sorted(val) == sorted(val_keys)  # each once: no padding duplicates


@pytest.mark.slow
@pytest.mark.parametrize("source", ["optimized", "folder"])
def test_kill_9_mid_epoch_resumes_exactly(source, image_folder, backbone_file, tmp_path):
    root = image_folder
    if source == "optimized":
        root = tmp_path / "optimized"
        optimize_folder(FolderSource(image_folder), root, num_workers=1)
    args = [
        "fit", *FAST, f"--data.root={root}", f"--model.weights={backbone_file('test_resnet')}", "--seed_everything=7",
        "--trainer.max_epochs=2", "--data.num_workers=2", "--data.batch_size=4", "--data.hflip=0.5",
        "--last_every_n_steps=3", "--trainer.callbacks+=helpers.SlowSteps",
    ]  # fmt: skip

    straight = run_named(tmp_path, args, "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    victim = start_named(tmp_path, args, "killed")
    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 240
        step = 0
        while time.time() < deadline and victim.poll() is None:  # a mid-epoch last.ckpt of the second epoch
            if last.exists():
                with contextlib.suppress(Exception):
                    step = torch.load(last, weights_only=True)["global_step"]
            if step in (12,):  # 9 steps an epoch (36 samples / 4): step 12 is 3 steps into epoch 1
                break
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 1, "the kill should land mid-epoch"

    resumed = run_named(tmp_path, args, "killed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = {}
    for name in ("straight", "killed"):
        ckpt = torch.load(tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 18
        final[name] = ckpt["state_dict"]
    for key, value in final["straight"].items():
        torch.testing.assert_close(final["killed"][key], value, rtol=1e-5, atol=1e-6)


def test_the_datamodule_works_on_its_own(image_folder, tmp_path):
    optimize_folder(FolderSource(image_folder), tmp_path / "optimized", num_workers=1)
    for root in (image_folder, tmp_path / "optimized"):
        dm = ImageFolderDataModule(root=str(root), model_name="vit_small_patch16_224", num_workers=0, batch_size=5)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch.images.shape == (5, 3, 224, 224) and batch.labels.shape == (5,) and len(batch.keys) == 5
        assert dm.data_config["mean"] == (0.5, 0.5, 0.5)  # vit_small_patch16_224's own normalisation


@pytest.mark.slow
def test_optimize_killed_half_way_leaves_no_complete_looking_dataset(tmp_path):
    photos = tmp_path / "photos"
    jpeg = _photo(1600, 1200)
    for cls in ("a", "b"):
        (photos / "train" / cls).mkdir(parents=True)
        for i in range(60):
            (photos / "train" / cls / f"{i}.jpg").write_bytes(jpeg)
    out = tmp_path / "optimized"
    command = cli_command("optimize", f"--data.root={photos}", f"--output={out}", "--num_workers=1", "--max_side=1024")
    victim = subprocess.Popen(
        command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and victim.poll() is None and not list(out.glob("train/*.bin")):
            time.sleep(0.05)
        assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
        os.killpg(victim.pid, signal.SIGKILL)  # the whole group: LitData's worker processes too
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    assert not (out / "vision_lora_dataset.json").exists()
    with pytest.raises(ValueError, match="incomplete optimized dataset"):
        ImageFolderDataModule(root=str(out))
    report = optimize_folder(FolderSource(photos), out, max_side=256, num_workers=1)  # the rerun rebuilds it
    assert report.counts == {"train": 102, "val": 18} and ImageFolderDataModule(root=str(out)).num_classes == 2
