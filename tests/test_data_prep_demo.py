"""The demo dataset: deterministic synthesis in the PACS layout, and ensure_demo_shards idempotence."""
from __future__ import annotations

import os

from data_prep.demo import ensure_demo_shards
from data_prep.manifest import load_manifest
from data_prep.synth import DOMAINS, write_demo_dataset
from data_prep.synth_shapes import CLASSES
from data_prep.verify import verify
from support.data_prep_samples import tree_bytes

SMALL = dict(image_size=16, images_per_class=5)


def test_synth_is_deterministic_and_pacs_shaped(tmp_path):
    write_demo_dataset(tmp_path / "a", **SMALL)
    write_demo_dataset(tmp_path / "b", **SMALL)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    for domain in DOMAINS:
        test_lines = (tmp_path / "a" / f"{domain}_test_kfold.txt").read_text().splitlines()
        crossval = (tmp_path / "a" / f"{domain}_crossval_kfold.txt").read_text().splitlines()
        train = (tmp_path / "a" / f"{domain}_train_kfold.txt").read_text().splitlines()
        assert sorted(test_lines) == sorted(train + crossval) and len(test_lines) == 5 * len(CLASSES)
        assert len(crossval) == len(CLASSES)  # 20% of 5 per class
    assert (tmp_path / "a/kfold/photo/star/photo_star_0000.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


def test_ensure_demo_shards_builds_once_and_reuses(tmp_path):
    root = ensure_demo_shards(tmp_path / "cache", **SMALL)
    manifest = load_manifest(root)
    assert manifest.domains == tuple(sorted(DOMAINS)) and manifest.classes == tuple(CLASSES)
    assert sum(manifest.num_samples(d) for d in manifest.domains) == 4 * 6 * 5
    assert verify(root, decode=True, progress=False) == []
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert ensure_demo_shards(tmp_path / "cache", **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamp  # nothing rewritten


def test_ensure_demo_shards_recovers_from_an_interruption(tmp_path):
    root = ensure_demo_shards(tmp_path / "cache", **SMALL)
    reference = tree_bytes(root, with_state=False)
    (root / "_info.json").unlink()  # as if killed before the manifest was written
    next(root.glob("sketch/train-*.tar")).unlink()
    (root.parent / "src" / "_synth.json").unlink()  # and the source set as if never finished
    (root.parent / ".src.999.tmp").mkdir()  # a leftover temporary folder
    assert ensure_demo_shards(tmp_path / "cache", **SMALL) == root
    assert tree_bytes(root, with_state=False) == reference
    assert not (root.parent / ".src.999.tmp").exists()


def test_a_moved_cache_is_rebuilt_in_place(tmp_path):
    """Its manifest names the old src: the converter refuses another source's root, the demo does not."""
    root = ensure_demo_shards(tmp_path / "cache", **SMALL)
    reference = tree_bytes(root, with_state=False)
    os.rename(tmp_path / "cache", tmp_path / "moved")
    moved = ensure_demo_shards(tmp_path / "moved", **SMALL)
    assert load_manifest(moved).converter["args"]["src"] == str(moved.parent / "src")
    assert tree_bytes(moved, with_state=False).keys() == reference.keys()


def test_other_parameters_get_their_own_folder(tmp_path):
    small = ensure_demo_shards(tmp_path / "cache", **SMALL)
    other = ensure_demo_shards(tmp_path / "cache", image_size=16, images_per_class=5, seed=1)
    assert small != other and os.path.isdir(small) and os.path.isdir(other)


def test_cached_version_1_demo_is_upgraded_in_place(tmp_path):
    import json

    from data_prep.manifest import write_manifest

    root = ensure_demo_shards(tmp_path / "cache", **SMALL)
    current = (root / "_info.json").read_bytes()
    raw = json.loads(current)
    raw["format_version"] = 1  # what an older data_prep left in ~/.cache/rsc_dist/demo
    for domain in raw["splits"].values():
        for split in domain.values():
            for shard in split["shards"]:
                del shard["sample_offsets"]
    write_manifest(root, raw)
    shards = {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}
    assert ensure_demo_shards(tmp_path / "cache", **SMALL) == root
    assert (root / "_info.json").read_bytes() == current and load_manifest(root).format_version == 2
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")} == shards  # upgraded, not rebuilt


_HOLD_LOCK = """
import signal, sys, time
from pathlib import Path
from data_prep.demo import _exclusive
from data_prep.parallel import unordered_map
from support.data_prep_samples import signal_dispositions

signal.signal(signal.SIGTERM, lambda *a: None)  # as the trainer does before it builds the demo
signal.signal(signal.SIGUSR1, lambda *a: None)
with _exclusive(Path(sys.argv[1])):
    if sys.argv[2] == "pool":
        with unordered_map(2, 2) as imap:
            print([p.pid for p in imap.func.__self__._pool], flush=True)  # every worker, to clean up
            print(list(imap(signal_dispositions, [0.5, 0.5])), flush=True)
            print("locked", flush=True)
            list(imap(time.sleep, [60, 60]))  # workers alive while the parent is killed
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(tmp_path, mode: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(repo / "tests"), os.environ.get("PYTHONPATH")]))  # for support.*
    process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / ".lock"), mode], cwd=repo,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
    lines = [process.stdout.readline()]
    while lines[-1].strip() != "locked":
        assert lines[-1], "the lock holder exited early"
        lines.append(process.stdout.readline())
    return process, lines[:-1]


def test_demo_lock_wait_times_out_naming_the_lock_and_kill_9_releases_it(tmp_path):
    import signal

    import pytest

    from data_prep.demo import DemoLockTimeout, _exclusive

    holder, _ = _holder(tmp_path, "plain")
    try:
        with pytest.raises(DemoLockTimeout, match=f"demo lock {tmp_path / '.lock'} \\(held by pid {holder.pid}\\)"):
            with _exclusive(tmp_path / ".lock", timeout=0.3):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with _exclusive(tmp_path / ".lock", timeout=5):  # the kernel dropped the dead holder's flock
        pass


def test_pool_workers_reset_signals_and_do_not_keep_the_demo_lock(tmp_path):
    import ast
    import os
    import signal

    from data_prep.demo import _exclusive

    holder, lines = _holder(tmp_path, "pool")
    pids, states = ast.literal_eval(lines[0].strip()), ast.literal_eval(lines[1].strip())
    try:
        assert len(pids) == 2 and sorted(s["pid"] for s in states) == sorted(pids)
        for state in states:  # the parent ignores SIGTERM/SIGUSR1; its workers must not
            assert (state["SIGTERM"], state["SIGINT"], state["SIGUSR1"]) == ("SIG_DFL", "default_int_handler",
                                                                             "SIG_DFL")
            assert state["blocked"] == []
        holder.send_signal(signal.SIGKILL)  # the workers live on (sleeping), orphaned
        holder.wait()
        with _exclusive(tmp_path / ".lock", timeout=5):  # they do not hold the lock
            pass
    finally:
        holder.kill()
        holder.wait()
        for pid in pids:  # the orphaned workers this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
