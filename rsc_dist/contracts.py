"""What the trainer promises to the programs around it (launchers, SLURM scripts, results.py).

Defined once here; the shell scripts in launch/slurm/ repeat the literals (shell cannot import
Python), and tests/test_contracts.py checks that they are equal.

Exit codes of ``rsc_dist.train`` (and ``rsc_dist.evaluate``):
    0   finished (or already finished)
    1   an unexpected error (a bug, a crashed rank): the traceback is printed
    2   bad configuration, data or checkpoint; the last line names the file, key or value
    3   non-finite loss; the last good checkpoint is kept
    75  stopped on request (SIGTERM/SIGUSR1, train.stop_at_step) after saving a checkpoint;
        rerun the same command to resume (EX_TEMPFAIL)

Launchers (torchrun, ``accelerate launch``) turn a rank's 75 into their own 1, so a stop that
should be resumed is also announced by the file ``RUN/preempted.json``:
    {"step": <int>, "reason": "<SIGTERM | SIGUSR1 | train.stop_at_step=N>"}

``RUN/results.json`` layout, schema version 2 (version 1 had no "schema_version" key):
    schema_version   2
    config           the resolved config (nested dict)
    fingerprint      hash of the settings that define the run's trajectory
    algorithm, dataset, arch, seed, targets [..], sources [..]
    best, last       {"step", "val_acc", "val_per_domain": {D: acc}, "target_acc": {D: acc},
                      "target_top5": {D: acc}}; best = the best source-validation step
    best_checkpoint  path of RUN/checkpoints/best (relative to RUN), or null
    steps            optimizer-independent training steps done
    throughput_img_s training images per second (forward batch, all ranks)
    history          every evaluation, in order
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75

PREEMPTED_MARKER = "preempted.json"
RESULTS_FILE = "results.json"
RESULTS_SCHEMA_VERSION = 2
CONFIG_FILE = "config.yaml"
