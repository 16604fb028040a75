"""The docs and the benchmark scripts stay honest: every `vision-lora` command line in README.md and docs/*.md
parses, every Python block of README.md runs, every relative link and benchmark JSON path resolves, and every
benchmark script answers `--help`."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
FUNCTION_COMMANDS = ("export", "serve", "optimize", "targets", "tune", "explain")

# Command lines of the docs that cannot parse as written: a file the reader makes first stands in the line.
UNPARSEABLE = {
    "vision-lora test --config runs/.../config.yaml --ckpt_path best": "runs/.../config.yaml: the config of your run",
    "vision-lora test --config runs/lightning_logs/version_0/config.yaml --ckpt_path best": (
        "the config that the README's fit writes first"
    ),
    "vision-lora fit --config my.yaml --data.root ~/pets_optimized": "my.yaml stands for your own config",
}

# README Python blocks that are not run, by index among the README's Python blocks: {index: reason}.
SKIPPED: dict[int, str] = {}

# What the README's Python blocks may name, and what the test runs instead: tiny timm models, no hub download.
SUBSTITUTIONS = [
    (r'"vit_(small|base)_patch16_224[\w.]*"', '"test_vit"'),
    (r'"convnext_\w+[\w.]*"', '"test_convnext"'),
    (r'"resnet\d+[\w.]*"', '"test_resnet"'),
    (r'"tf_efficientnet_lite0"', '"test_efficientnet"'),
    (r"pretrained=True", "pretrained=False"),
    (r'weights="(hub|pretrained|offline)"', 'weights="random"'),
    (r'"data/digits"', repr(str(REPO / "data" / "digits")).replace("'", '"')),
]


def _blocks(path: Path) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown file as (language, text)."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S)


def _command_lines() -> list[tuple[str, str]]:
    """(page, command line) for every `vision-lora ...` line in a code block: continuations joined, comments
    dropped, spaces collapsed."""
    found = []
    for page in PAGES:
        for _, text in _blocks(page):
            for line in text.replace("\\\n", " ").splitlines():
                if line.strip().startswith("vision-lora "):
                    words = shlex.split(line, comments=True)
                    found.append((page.relative_to(REPO).as_posix(), " ".join(words)))
    return found


COMMAND_LINES = _command_lines()


def _run_main(args: list[str]) -> int:
    from vision_lora.cli import main

    try:
        main(args)
    except SystemExit as exit:
        return 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    return 0


@pytest.mark.parametrize("line", sorted({line for _, line in COMMAND_LINES}), ids=lambda line: line)
def test_every_command_line_in_the_docs_parses(line: str, monkeypatch, capsys):
    if line in UNPARSEABLE:
        pytest.skip(UNPARSEABLE[line])
    monkeypatch.chdir(REPO)  # configs/... resolves
    command, *args = shlex.split(line)[1:]
    if command in TRAINER_COMMANDS:
        from vision_lora.cli import main

        with pytest.raises(SystemExit) as exit:
            main([command, *args, "--print_config"])
        assert exit.value.code in (0, None), capsys.readouterr().err[-2000:]
        return
    assert command in FUNCTION_COMMANDS, f"{command!r} is not a vision-lora command"
    if _run_main([command, *args, "--print_config"]) == 0:
        return
    capsys.readouterr()
    code = _run_main([command, *args, "--help"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    flags = {arg.split("=")[0] for arg in args if arg.startswith("--")}
    assert not [flag for flag in flags if flag not in out.out], f"options missing from {command} --help: {flags}"


def test_the_unparseable_list_names_only_lines_in_the_docs():
    assert set(UNPARSEABLE) <= {line for _, line in COMMAND_LINES}


README_PYTHON = [text for lang, text in _blocks(REPO / "README.md") if lang == "python"]


@pytest.mark.parametrize("index", range(len(README_PYTHON)))
def test_every_python_block_of_the_readme_runs(index: int, tmp_path, monkeypatch):
    if index in SKIPPED:
        pytest.skip(SKIPPED[index])
    code = README_PYTHON[index]
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def test_every_python_block_in_the_docs_compiles_and_the_readme_is_ruff_formatted():
    for page in PAGES:
        for i, (lang, text) in enumerate(_blocks(page)):
            if lang == "python":
                compile(text, f"{page.name} block {i}", "exec")
    ruff = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if ruff.returncode != 0:
        pytest.skip("ruff is not installed")
    for i, text in enumerate(README_PYTHON):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--line-length", "120", "--diff", "-"],
            input=text,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert result.returncode == 0, f"README.md python block {i} is not ruff-formatted:\n{result.stdout}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken


def test_every_benchmark_json_the_docs_name_exists():
    named = {m for page in PAGES for m in re.findall(r"benchmarks/[\w/]+\.json", page.read_text(encoding="utf-8"))}
    assert named and not [path for path in named if not (REPO / path).is_file()]
    assert not list((REPO / "benchmarks").glob("*.json")), "benchmark JSON lives in benchmarks/results/"


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_script_answers_help(script: str):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
