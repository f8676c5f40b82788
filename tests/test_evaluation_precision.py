"""Evaluation runs under the autocast training's forward runs under, DeepSpeed included (where
Accelerate's own autocast does nothing and the engine's forward autocasts by itself)."""

import contextlib
from types import SimpleNamespace

import torch

from rsc_dist.trainer import build, evaluation


def _deepspeed_accelerator(precision):
    config = {"bf16": {"enabled": precision == "bf16"}}
    build.use_deepspeed_mixed_precision(config)  # what the trainer gives DeepSpeed
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), device=torch.device("cpu"))


def _output_dtype(accelerator):
    layer = torch.nn.Linear(4, 4)
    with evaluation.evaluation_autocast(accelerator):
        return layer(torch.ones(2, 4)).dtype


def test_a_bf16_deepspeed_run_evaluates_under_bf16_autocast():
    assert _output_dtype(_deepspeed_accelerator("bf16")) == torch.bfloat16
    assert _output_dtype(_deepspeed_accelerator("no")) == torch.float32


def test_without_deepspeed_evaluation_uses_accelerates_autocast():
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(True)
        yield

    ddp = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), autocast=autocast)
    assert _output_dtype(ddp) == torch.float32 and entered == [True]
