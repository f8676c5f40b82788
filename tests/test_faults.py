"""Faults injected into real runs: bad data ends the whole job within seconds with the data at
fault named on the last line; resuming with changed settings is refused (or forced)."""

import json
import shutil
import time

import pytest

from data_prep.manifest import load_manifest
from rsc_dist import train
from rsc_dist.core.contracts import CHECKPOINTS_DIR, RESULTS_FILE
from support.data_prep_samples import corrupt_first_image
from support.trainer_fixtures import explain, launch, tiny_config

pytestmark = pytest.mark.slow


def _copy(tmp_path, shards):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


@pytest.mark.parametrize("processes, workers", [(1, 1), (2, 1), (2, 0)])
def test_a_corrupt_sample_ends_the_job_quickly_naming_it(tmp_path, tiny_shards, processes, workers):
    shards = _copy(tmp_path, tiny_shards)
    victim = corrupt_first_image(shards, "photo")
    # Batches of the whole source set: the corrupt sample is in the first step of every rank.
    config = tiny_config(tmp_path, shards, data={"global_batch_size": 64, "workers": workers},
                         train={"max_steps": 4})
    started = time.monotonic()
    result = launch(["--config", str(config), "--output_dir", str(tmp_path / "run")], processes=processes,
                    timeout=240)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, explain(result)
    lines = [line for line in result.stderr.strip().splitlines() if "rsc_dist.train: error:" in line]
    assert lines and str(victim) in lines[0] and "cannot decode" in lines[0], explain(result)
    assert elapsed < 120, f"took {elapsed:.0f} s"


def test_a_truncated_shard_is_refused_at_start(tmp_path, tiny_shards, capsys):
    shards = _copy(tmp_path, tiny_shards)
    manifest = load_manifest(shards)
    shard = manifest.shards("cartoon", "train")[0]
    path = manifest.root / shard.file
    with open(path, "r+b") as handle:  # cut between two samples: a streaming reader ends quietly
        handle.truncate(shard.sample_offsets[3])
    config = tiny_config(tmp_path, shards)
    assert train.main(["--config", str(config), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"shard {path} is {shard.sample_offsets[3]} bytes; the manifest says {shard.num_bytes}" in err


def test_resume_with_changed_settings_is_refused_then_forced(tmp_path, tiny_shards, capsys):
    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 4, "checkpoint_every_steps": 2})
    run = ["--config", str(config), "--output_dir", str(tmp_path / "run")]
    assert train.main(run + ["--train.stop_at_step=2"]) == 75
    capsys.readouterr()
    assert train.main(run + ["--optim.lr=0.1", "--algorithm", "erm"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "does not continue this run" in err
    assert "resumed from" not in captured.out  # a refused resume never says it resumed
    assert "optim.lr: 0.01 -> 0.1" in err and "algorithm: 'rsc' -> 'erm'" in err
    assert not (tmp_path / "run" / RESULTS_FILE).exists()
    # Settings that do not change the trajectory may change.
    assert train.main(run + ["--train.log_every_steps=1", "--train.stop_at_step=3"]) == 75
    capsys.readouterr()
    assert train.main(run + ["--optim.lr=0.1", "--resume", "force"]) == 0
    out = capsys.readouterr().out
    assert "--resume force" in out
    results = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert results["steps"] == 4


def test_a_checkpoint_of_the_old_sample_order_is_refused_clearly(tmp_path, tiny_shards, capsys):
    import torch

    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 4})
    run = ["--config", str(config), "--output_dir", str(tmp_path / "run")]
    assert train.main(run + ["--train.stop_at_step=2"]) == 75
    checkpoint = next((tmp_path / "run" / CHECKPOINTS_DIR).glob("checkpoint_*"))
    # Rewrite the TrainState as the previous version wrote it (stream_layout, no data_order).
    for state_file in checkpoint.glob("custom_checkpoint_*.pkl"):
        state = torch.load(state_file, weights_only=False)
        if isinstance(state, dict) and "data_order" in state:
            state.pop("data_order")
            state.pop("settings")
            state["stream_layout"] = {"world_size": 1, "workers": 1, "batch_per_rank": 8, "steps_per_epoch": 4}
            torch.save(state, state_file)
    capsys.readouterr()
    assert train.main(run) == 2
    assert "order version 1" in capsys.readouterr().err
