"""Every command the documentation shows runs as written, as far as a test without data and GPUs
can tell: its entry point exists and answers --help, every flag it is shown with is one the
command accepts (for the trainer: its own options and every config field), and the presets,
sweep files, accelerate configs and scripts it names exist.

The commands are read from the fenced shell blocks of README.md, launch/README.md,
data_prep/README.md, docs/*.md and BENCHMARKS.md (continuation lines joined). The end-to-end
behaviour of each is tested elsewhere, scaled down; this is what keeps a renamed flag or module
from leaving the docs behind.
"""

import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "launch/README.md", "data_prep/README.md", "BENCHMARKS.md",
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SUBCOMMANDS = {"data_prep": ("convert", "verify", "index", "synth")}


def documented_lines() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    found.append((doc, line))
    return found


def _words(line: str) -> list[str]:
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # optional parts shown as [--flag VALUE]
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def commands() -> list[tuple[str, str, str, list[str]]]:
    """(doc, line, entry point, arguments) for every invocation of a project entry point."""
    found = []
    for doc, line in documented_lines():
        for part in re.split(r"&&|\|\||;|\|", line):
            words = _words(part)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if "-m" in words:
                i = words.index("-m")
                module = words[i + 1] if i + 1 < len(words) else ""
                if module.startswith(("rsc_dist", "data_prep")):
                    found.append((doc, line, module, words[i + 2:]))
            elif any(w.endswith("rsc_dist/train.py") for w in words) and "launch" in words:
                i = next(i for i, w in enumerate(words) if w.endswith("rsc_dist/train.py"))
                found.append((doc, line, "accelerate launch", words[:i]))
                found.append((doc, line, "rsc_dist.train", words[i + 1:]))
            elif any(w.endswith("train.sbatch") for w in words):
                i = next(i for i, w in enumerate(words) if w.endswith("train.sbatch"))
                found.append((doc, line, "script", [words[i]]))
                found.append((doc, line, "rsc_dist.train", words[i + 1:]))
            elif words[:1] in (["bash"], ["sbatch"]):
                found.append((doc, line, "script", [w for w in words[1:] if w.startswith("launch/")][:1]))
    return found


@cache
def help_text(module: str, subcommand: str = "") -> str:
    """What ``python -m MODULE [SUBCOMMAND] --help`` prints (run in this process)."""
    out = io.StringIO()
    argv = [module, *([subcommand] if subcommand else []), "--help"]
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved
    assert done.value.code in (0, None), f"python -m {' '.join(argv[:-1])} --help exited {done.value.code}"
    return out.getvalue()


@cache
def trainer_flags() -> frozenset:
    from rsc_dist.config import describe_fields

    return frozenset(flag for flag, _, _ in describe_fields()) | _flags_in(help_text("rsc_dist.train"))


@cache
def accelerate_flags() -> frozenset:
    from accelerate.commands.launch import launch_command_parser

    return frozenset(option for action in launch_command_parser()._actions for option in action.option_strings)


def _flags_in(text: str) -> frozenset:
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w.-]*)", text))


def _flags_of(arguments: list[str]) -> list[str]:
    return [a.split("=")[0] for a in arguments if a.startswith("--")]


COMMANDS = commands()


def test_the_docs_show_commands():
    assert {entry for _, _, entry, _ in COMMANDS} >= {"rsc_dist.train", "rsc_dist.results", "rsc_dist.sweep",
                                                      "rsc_dist.evaluate", "data_prep", "accelerate launch"}


@pytest.mark.parametrize("doc, line, entry, arguments", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c, _, _ in COMMANDS])
def test_a_documented_command_is_accepted(doc, line, entry, arguments):
    where = f"{doc}: {line}"
    if entry == "script":
        assert arguments and (REPO / arguments[0]).is_file(), where
        return
    if entry == "accelerate launch":
        unknown = [f for f in _flags_of(arguments) if f not in accelerate_flags()]
        assert not unknown, f"{where}: accelerate launch has no {unknown}"
        config = next((a for a in arguments if a.endswith(".yaml")), None)
        assert config is None or (REPO / config).is_file(), where
        return
    if entry == "rsc_dist.train":
        unknown = [f for f in _flags_of(arguments) if f not in trainer_flags()]
        assert not unknown, f"{where}: the trainer has no {unknown}"
        preset = arguments[arguments.index("--config") + 1] if "--config" in arguments else "..."
        if preset != "...":
            from rsc_dist.config import preset_path

            preset_path(preset)  # a preset name or file
        return
    subcommand = arguments[0] if arguments and arguments[0] in SUBCOMMANDS.get(entry, ()) else ""
    flags = _flags_in(help_text(entry, subcommand))
    unknown = [f for f in _flags_of(arguments) if f not in flags and f != "--help"]
    assert not unknown, f"{where}: python -m {entry} {subcommand} has no {unknown}"
    for argument in arguments:
        if argument.startswith("launch/") and argument.endswith(".yaml"):
            assert (REPO / argument).is_file(), where
