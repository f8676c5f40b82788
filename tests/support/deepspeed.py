"""DeepSpeed in the tests: the environment accelerate launch gives a DeepSpeed config's ranks,
a fresh Accelerate state between in-process runs, launches with a config file, and the whole
weights of a ZeRO checkpoint."""

from pathlib import Path

import yaml

from support.trainer_fixtures import REPO, launch

ACCELERATE_CONFIGS = REPO / "launch" / "accelerate"


def launch_with_config(config_file, processes: int, args: list[str], timeout: int = 400, env=None):
    """``accelerate launch --config_file CONFIG --num_processes N rsc_dist/train.py ARGS`` (trainer_fixtures.launch
    with a config file)."""
    return launch(args, processes=processes, config_file=config_file, timeout=timeout, env=env)


# accelerate launch turns a DeepSpeed config file's keys into these variables for the ranks.
_DEEPSPEED_ENV = {"zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                  "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                  "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                  "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                  "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
                  "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"}


def deepspeed_launch_env(config_file: Path) -> dict:
    """The environment ``accelerate launch --config_file CONFIG`` gives each rank of a DeepSpeed config."""
    raw = yaml.safe_load(config_file.read_text())
    assert raw["distributed_type"] == "DEEPSPEED"
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": raw["mixed_precision"]}
    for key, value in raw["deepspeed_config"].items():
        if key in _DEEPSPEED_ENV:
            env[_DEEPSPEED_ENV[key]] = str(value).lower()
    return env


def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # the process group itself stays
    GradientState._reset_state()


def consolidated_weights(checkpoint):
    """Whole fp32 weights and buffers from a DeepSpeed ZeRO checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
