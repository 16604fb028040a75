"""The shape of the package: module sizes, no import cycles, a Lightning-free core, one owner of the data config's
defaults, one command line with every command, optional extras that fail in one line, old import paths."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vision_lora import VisionLoRAError
from vision_lora.cli import COMMANDS, main

PACKAGE = Path(__file__).resolve().parent.parent / "vision_lora"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its `__init__`)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports when it is imported (statements outside functions), each with the
    packages above it that the import runs (`a.b.c` runs `a/__init__` and `a.b/__init__`), except the importer's own
    packages, which are already being imported when it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [n for n in tree.body]
    while nodes:  # module level, including the bodies of if / try at module level
        node = nodes.pop()
        if isinstance(node, (ast.If, ast.Try)):
            nodes += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            nodes += node.body
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    out = set()
    for target in found:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix not in ancestors:
                out.add(prefix)
    return out


def test_no_module_is_over_500_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
    assert "vision_lora.preprocess" in graph["vision_lora.data.datamodule"]  # the walk sees relative imports
    assert "vision_lora.data" in graph["vision_lora.trainer_cli"]  # and counts the packages an import runs


def test_lora_core_imports_no_lightning_litserve_or_litdata():
    code = (
        "import sys, vision_lora, vision_lora.lora, vision_lora.preprocess, vision_lora.weights, vision_lora.errors\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'lightning_fabric', 'litserve', 'litdata'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_no_benchmark_script_is_imported_by_the_libraries_it_uses():
    """A script's own folder comes first on `sys.path`: a benchmark named like a module a library probes for (e.g. a
    `kernels.py` beside a script that imports peft, which looks for the `kernels` package) is imported in its place."""
    benchmarks = PACKAGE.parent / "benchmarks"
    stems = sorted(p.stem for p in benchmarks.glob("*.py"))
    code = (
        f"import sys; sys.path.insert(0, {str(benchmarks)!r})\n"
        "import peft, timm, lightning, litdata, onnxruntime, safetensors, torchmetrics\n"
        "from peft import LoraConfig, get_peft_model\n"
        "get_peft_model(timm.create_model('test_vit'), LoraConfig(r=2, target_modules=['qkv']))\n"
        f"print(sorted(set(sys.modules) & set({stems!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_data_config_defaults_are_written_in_one_place():
    from vision_lora.preprocess import DATA_CONFIG_DEFAULTS, complete_data_config

    assert set(DATA_CONFIG_DEFAULTS) == {"interpolation", "crop_pct", "crop_mode", "mean", "std"}
    assert complete_data_config({"input_size": [3, 8, 8]})["crop_pct"] == 1.0
    for name, path in _modules().items():
        if name == "vision_lora.preprocess":
            continue
        text = path.read_text(encoding="utf-8")
        for key in DATA_CONFIG_DEFAULTS:
            assert f'.get("{key}", ' not in text, f"{name} defaults {key} itself"
        assert "'bicubic'" not in text and '"bicubic")' not in text, f"{name} defaults the interpolation itself"


def test_help_lists_every_command_and_each_command_has_help(capsys):
    main(["--help"])
    listing = capsys.readouterr().out
    assert listing.startswith("vision-lora ")
    for name in ("fit", "validate", "test", "predict", "export", "serve", "optimize", "targets"):
        assert f"\n  {name} " in listing
    for name in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0
        usage = capsys.readouterr().out.splitlines()[0]
        assert usage.startswith("usage: vision-lora") and f" {name}" in usage


def test_unknown_command_says_so(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fitt"])
    assert stop.value.code == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "module", "extra"),
    [
        (["serve", "--model", "model.onnx"], "litserve", "serve"),
        (["optimize", "--data.root", "x", "--output", "y"], "litdata", "stream"),
        (["tune", "--config", "x.yaml", "--n_trials", "2"], "optuna", "tune"),
    ],
)
def test_a_command_without_its_extra_fails_in_one_line(command, module, extra):
    code = f"import sys; sys.modules[{module!r}] = None\nfrom vision_lora.cli import main\nmain({command!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pip install 'vision-lora[{extra}]'" in lines[0] and module in lines[0]


def test_user_errors_are_one_type_and_one_line(tmp_path, monkeypatch, capsys):
    from vision_lora import LoRAConfig
    from vision_lora.module import LoRAClassifier

    assert issubclass(VisionLoRAError, ValueError)
    with pytest.raises(VisionLoRAError, match="rank r must be >= 1"):
        LoRAConfig(r=0)
    model = LoRAClassifier(backbone="test_vit", num_classes=3)
    import torch

    with pytest.raises(VisionLoRAError, match="Training diverged"):
        model._check_finite(torch.tensor(float("nan")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["export", "--adapter", str(tmp_path / "missing")])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vision-lora: error: ") and "missing" in err[0]


@pytest.mark.parametrize(
    ("old", "names"),
    [
        ("vision_lora.inject", ["LoRAConfig", "apply_lora", "resolve_targets", "classifier_names", "main"]),
        ("vision_lora.layers", ["LoRALinear", "LoRAQKVLinear", "LoRAConv2d", "QKVLayout"]),
        ("vision_lora.adapter", ["save_adapter", "load_adapter", "read_adapter_config", "save_merged"]),
        ("vision_lora.peft_format", ["save_peft_adapter", "load_peft_adapter"]),
        ("vision_lora.export", ["export_onnx", "load_model", "quantize_int8", "read_onnx_metadata"]),
        ("vision_lora.serve", ["serve", "ClassifierAPI", "RequestGate"]),
        ("vision_lora.runs", ["RunLogger"]),
    ],
)
def test_old_import_paths_keep_working(old, names):
    code = f"from {old} import {', '.join(names)}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_public_name_imports_from_the_top():
    import vision_lora

    for name in vision_lora.__all__:
        assert getattr(vision_lora, name) is not None


def test_python_m_inject_is_vision_lora_targets(capsys):
    from vision_lora.inject import main as inject_main

    inject_main(["test_vit", "--r", "4", "--target_modules", "qkv", "blocks.0.mlp.fc1"])
    old = capsys.readouterr().out
    main(["targets", "test_vit", "--r", "4", "--target_modules", '["qkv", "blocks.0.mlp.fc1"]'])
    assert capsys.readouterr().out == old
    assert "blocks.0.mlp.fc1" in old and "7 adapted modules" in old
