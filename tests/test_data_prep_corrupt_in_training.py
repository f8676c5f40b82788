"""A corrupt sample met while TRAINING ends the run with one clean line: exit 2, the error on
its own line (not glued to the progress bar) and last, no DataLoader "worker killed" traceback
from the loader workers being reaped at exit."""
import os
import shutil
import subprocess
import sys

import pytest

from support.data_prep_samples import corrupt_first_image
from support.trainer_fixtures import REPO, explain, tiny_config

pytestmark = pytest.mark.slow


def test_a_corrupt_sample_in_training_is_one_clean_error_line(tmp_path, tiny_shards):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = corrupt_first_image(shards, "photo")
    # Batches of the whole source set, read by a loader worker: the corrupt sample is in step 1.
    config = tiny_config(tmp_path, shards, data={"global_batch_size": 64, "workers": 1}, train={"max_steps": 4})
    result = subprocess.run([sys.executable, "-m", "rsc_dist.train", "--config", str(config),
                             "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=240,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr and "killed by signal" not in result.stderr, explain(result)
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("rsc_dist.train: error: sample ") and f"in {victim}: cannot decode" in last, explain(result)
