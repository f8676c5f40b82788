"""What the launcher asks for runs as asked or stops with the reason: DeepSpeed is engaged on CPU
ranks (never silently replaced by DDP), and GPU-only requests on a machine without CUDA stop
(exit 2, one line) or run on the CPU as a stand-in with a note saying so."""

import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from rsc_dist import bench
from rsc_dist.config import ConfigError, load_config
from rsc_dist.trainer import build
from support.deepspeed import ACCELERATE_CONFIGS
from support.trainer_fixtures import REPO, explain, launch, tiny_config


@pytest.fixture
def no_cuda(monkeypatch):
    """This process sees no GPU (so the checks below mean the same on a GPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_MIXED_PRECISION",
                 "ACCELERATE_USE_DEEPSPEED", "RSC_DIST_CPU_RANK"):
        monkeypatch.delenv(name, raising=False)


def _config(*overrides):
    return load_config("demo", list(overrides))


def test_deepspeed_request_without_deepspeed_installed_stops(no_cuda, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match="asks for DeepSpeed .* but deepspeed is not installed"):
        build.make_accelerator(_config(), tmp_path)


def test_deepspeed_bf16_becomes_torch_autocast_and_fp16_is_refused():
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    build.use_deepspeed_mixed_precision(config)
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []} and not config["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="fp16 is not supported .* BatchNorm"):
        build.use_deepspeed_mixed_precision({"fp16": {"enabled": "true"}})
    untouched = {"bf16": {"enabled": False}}
    build.use_deepspeed_mixed_precision(untouched)
    assert "torch_autocast" not in untouched


def test_deepspeed_ops_are_built_by_this_environments_ninja(tmp_path):
    """Whatever PATH the launcher gave (an activated environment under SLURM, a bare
    .venv/bin/python elsewhere), DeepSpeed's JIT builds run the ninja installed with this
    Python: two ninja versions would each take the other's build for stale and recompile."""
    ninja = pytest.importorskip("ninja")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\nexit 0\n")
    (other / "ninja").chmod(0o755)
    env = {"PATH": os.pathsep.join([str(other), ninja.BIN_DIR, "/usr/bin"])}
    build.use_this_environments_ninja(env)
    assert env["PATH"].split(os.pathsep) == [ninja.BIN_DIR, str(other), "/usr/bin"]
    assert shutil.which("ninja", path=env["PATH"]) == os.path.join(ninja.BIN_DIR, "ninja")


def test_deepspeed_ops_are_cached_per_environment(monkeypatch, tmp_path):
    """Each virtual environment keeps its own builds (<venv>/torch_extensions): two checkouts'
    environments sharing ~/.cache/torch_extensions rebuilt each other's op at every switch. A
    folder the user chose is kept; outside a virtual environment torch's default stays."""
    venv = tmp_path / "checkout" / ".venv"
    venv.mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    env = {}
    assert build.use_this_environments_extension_cache(env) == venv / "torch_extensions"
    assert env == {"TORCH_EXTENSIONS_DIR": str(venv / "torch_extensions")}
    chosen = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert build.use_this_environments_extension_cache(chosen) is None and chosen == {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # the system's Python
    bare = {}
    assert build.use_this_environments_extension_cache(bare) is None and bare == {}


@pytest.mark.parametrize("deepspeed", [True, False])
def test_make_accelerator_puts_this_environments_ninja_first_only_for_deepspeed(no_cuda, monkeypatch, deepspeed):
    """The helpers above are called where it matters: before the Accelerator (whose DeepSpeed
    process group builds the op) is made, and a run without DeepSpeed keeps its PATH and its
    extension folder."""
    ninja = pytest.importorskip("ninja")

    class Built(Exception):
        pass

    def stop_before_the_process_group(**kwargs):
        raise Built

    monkeypatch.setattr(build, "Accelerator", stop_before_the_process_group)
    monkeypatch.setitem(sys.modules, "deepspeed", ModuleType("deepspeed"))  # importable, cheaply
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    if deepspeed:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(Built):
        build.make_accelerator(_config(), None)
    assert os.environ["PATH"] == (os.pathsep.join([ninja.BIN_DIR, "/usr/bin"]) if deepspeed else "/usr/bin")
    in_venv = sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK)
    expected = str(Path(sys.prefix) / "torch_extensions") if deepspeed and in_venv else None
    assert os.environ.get("TORCH_EXTENSIONS_DIR") == expected


@pytest.mark.parametrize("env, overrides, message", [
    ({"WORLD_SIZE": "4", "ACCELERATE_MIXED_PRECISION": "bf16"}, [],
     "4 ranks were started with a GPU launch config .* use --config_file launch/accelerate/cpu_2proc.yaml"),
    ({}, ["--train.mixed_precision=fp16"], "fp16 needs a CUDA GPU"),
    ({"WORLD_SIZE": "2"}, ["--model.sync_bn=true"], "sync_bn=true needs GPUs"),
])
def test_gpu_only_requests_stop_without_cuda(no_cuda, env, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build.check_device_requests(_config(*overrides), env=env)


def test_cpu_stand_ins_run_with_a_note(no_cuda, capsys):
    # The CPU-rank configs (mixed_precision 'no'), ranks this package started itself, and
    # DeepSpeed on CPU ranks are not GPU requests.
    for env in ({"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"},
                {"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16", "RSC_DIST_CPU_RANK": "1"},
                {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}):
        build.check_device_requests(_config(), env=env)
    build.check_device_requests(_config("--train.mixed_precision=bf16", "--model.sync_bn=true",
                                        "--data.decode=device"), env={})
    err = capsys.readouterr().err
    assert "bf16 runs as CPU autocast" in err
    assert "sync_bn=true with one process is plain BatchNorm" in err
    assert "data.decode=device decodes and augments in the training process on the CPU" in err
    build.check_device_requests(_config("--train.mixed_precision=bf16"), env={"RANK": "1"})
    assert capsys.readouterr().err == ""  # one note per run, from rank 0


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: this machine has no CUDA GPU"),
    ("tpu9", "--device tpu9: not a device name"),
])
def test_bench_device_errors_are_one_line(no_cuda, capsys, device, message):
    with pytest.raises(SystemExit) as exited:
        bench.main(["--device", device])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_gpu_launch_config_on_cpu_stops_before_training(tmp_path, tiny_shards):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU refusal")  # pragma: no cover - CI has no GPU
    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 1})
    result = launch(["--config", str(config), "--output_dir", str(tmp_path / "run")], processes=2,
                    config_file=REPO / "accelerate_config.yaml", timeout=200)
    assert result.returncode != 0, explain(result)
    assert "rsc_dist.train: error: 2 ranks were started with a GPU launch config" in result.stderr, explain(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _deepspeed_checkpoint(folder, ranks: int, shards: int):
    """The files of a ZeRO checkpoint written by ``ranks`` ranks (contents do not matter here)."""
    (folder / "pytorch_model").mkdir(parents=True)
    torch.save({}, folder / "pytorch_model" / "mp_rank_00_model_states.pt")
    for rank in range(shards):
        torch.save({}, folder / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    for rank in range(ranks):
        torch.save({}, folder / f"random_states_{rank}.pkl")
    torch.save({}, folder / "custom_checkpoint_0.pkl")
    return folder


def _launched(deepspeed: bool, processes: int):
    plugin = SimpleNamespace(deepspeed_config={}) if deepspeed else None
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


def test_deepspeed_checkpoint_under_another_engine_is_refused(tmp_path):
    from rsc_dist.trainer.checkpoints import CheckpointError, check_layout, find_damaged_file

    checkpoint = _deepspeed_checkpoint(tmp_path / "checkpoint_00000004", ranks=2, shards=2)
    assert find_damaged_file(checkpoint) is None
    check_layout(checkpoint, _launched(deepspeed=True, processes=2))  # what wrote it: loads
    # another number of ranks: re-partitioned while loading (tests/test_deepspeed_elastic.py)
    check_layout(checkpoint, _launched(deepspeed=True, processes=4))
    with pytest.raises(CheckpointError, match="written with DeepSpeed and this launch does not use DeepSpeed"):
        check_layout(checkpoint, _launched(deepspeed=False, processes=2))
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    (ddp / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"written without DeepSpeed \(DDP\) and this launch uses DeepSpeed"):
        check_layout(ddp, _launched(deepspeed=True, processes=2))
    # A shard missing is damage (skipped for the previous checkpoint), not another rank count.
    lacking = _deepspeed_checkpoint(tmp_path / "checkpoint_00000008", ranks=2, shards=1)
    assert find_damaged_file(lacking) == "pytorch_model holds 1 ZeRO optimizer shard(s) for 2 ranks"


# The configs' claims through `accelerate launch`: on a GPU (launch/gpu_checks.sh selects these by
# the cuda mark) one process on the demo data, bf16 as the GPU configs use it; without one, 2 CPU
# ranks on the tiny data (ZeRO-3 is launched on CPU ranks by tests/test_deepspeed_train.py).
_GPU = torch.cuda.is_available()
_STAGES = [pytest.param(stage, marks=pytest.mark.cuda) for stage in (1, 2, 3)] if _GPU else [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("stage", _STAGES)
def test_deepspeed_configs_train_through_accelerate_launch(tmp_path, tiny_shards, stage):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    if _GPU:  # pragma: no cover - CI has no GPU
        processes, args = 1, ["--config", "demo", "--train.max_steps=20", "--train.mixed_precision=bf16",
                              "--wandb.mode=disabled"]
    else:
        processes, args = 2, ["--config", str(tiny_config(tmp_path, tiny_shards, train={"max_steps": 2}))]
    result = launch([*args, "--output_dir", str(run)], processes=processes,
                    config_file=ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml", timeout=900)
    assert result.returncode == 0, explain(result)
    last = json.loads((run / "results.json").read_text())["last"]["step"]
    assert last == (20 if _GPU else 2)
    shards = list((run / "checkpoints" / f"checkpoint_{last:08d}" / "pytorch_model").glob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == processes  # DeepSpeed's ZeRO layout, not Accelerate's DDP one
