"""Documentation that gives code or commands is run as written: data_prep/README.md's Python
snippet, its ImageNet + ImageNet-Sketch commands, and those in the imagenet_resnet50 preset's
comment (on a miniature ImageNet, with /data/ moved into a temporary folder)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import data_prep.demo
from data_prep.manifest import load_manifest
from support.data_prep_samples import make_class_tree
from support.trainer_fixtures import REPO, python_path

README = REPO / "data_prep" / "README.md"
PRESET = REPO / "rsc_dist" / "configs" / "imagenet_resnet50.yaml"
SYNSETS = ["n01440764", "n01443537", "n01484850"]


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_python_snippet_runs(tiny_shards, monkeypatch):
    (snippet,) = [block for block in _code_blocks(README.read_text(), "python") if "ensure_demo_shards" in block]
    asked = []

    def cached_demo(cache_dir):  # the tiny demo shards stand in for the full demo build
        asked.append(cache_dir)
        return tiny_shards

    monkeypatch.setattr(data_prep.demo, "ensure_demo_shards", cached_demo)
    namespace = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    assert isinstance(asked[0], Path) and namespace["sample"]["__key__"].startswith("photo-")
    assert namespace["image"].shape[0] == 3 and str(namespace["image"].dtype) == "torch.uint8"


def _run_on_miniature(commands: list[str], tmp_path: Path) -> None:
    """Run shell commands that use /data/ILSVRC2012 and /data/imagenet-sketch, in tmp_path."""
    make_class_tree(tmp_path / "data/ILSVRC2012", ["train", "val"], SYNSETS, 1, ext="JPEG")
    make_class_tree(tmp_path / "data/imagenet-sketch", ["sketch"], SYNSETS, 1, ext="JPEG", name="s{i}")
    script = "\n".join(re.sub(r"^python ", f"{sys.executable} ", command).replace("/data/", f"{tmp_path}/data/")
                       for command in commands)
    env = {**os.environ, "PYTHONPATH": python_path(REPO)}
    result = subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def _both_domains(root: Path) -> None:
    manifest = load_manifest(root)
    assert manifest.domains == ("imagenet", "imagenet_sketch") and manifest.classes == tuple(SYNSETS)
    assert manifest.num_samples("imagenet_sketch", "test") == 3 and manifest.num_samples("imagenet", "train") == 3


def test_readme_imagenet_and_sketch_commands_make_one_root(tmp_path):
    (block,) = [b for b in _code_blocks(README.read_text(), "bash") if "ln -s" in b]
    commands = [line.split("  #")[0] for line in block.splitlines() if line and not line.startswith("#")]
    _run_on_miniature(commands, tmp_path)
    _both_domains(tmp_path / "data/shards/imagenet")


def test_imagenet_preset_commands_make_the_root_it_trains_on(tmp_path):
    text = PRESET.read_text()
    commands = [line[len("#   "):] for line in text.splitlines() if line.startswith("#   ")]
    assert len(commands) == 2 and commands[1].startswith("python -m data_prep convert"), commands
    _run_on_miniature(commands, tmp_path)
    preset = yaml.safe_load(text)
    root = tmp_path / preset["data"]["root"]
    _both_domains(root)
    assert set(preset["data"]["sources"]) | set(preset["data"]["target"]) == set(load_manifest(root).domains)
