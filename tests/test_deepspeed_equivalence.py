"""DeepSpeed ZeRO-1, -2 and -3 on 2 CPU ranks reach the weights of DDP on 2 ranks, RSC and ERM,
through the trainer's own assembly (build.make_accelerator, build.training_objects) and step
(rsc_dist.trainer.step.train_on_batch); RSC's masks under ZeRO-3, whose head weight is partitioned, equal DDP's.

Same global batch, BatchNorm statistics frozen (model.freeze_bn), fp32. One launch of 2 ranks
runs every variant in turn (Accelerate's state is reset between them; the gloo group stays).
"""

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from support.deepspeed import deepspeed_launch_env, fresh_accelerate_state
from support.dist_utils import run_on_ranks
from support.synthetic import synthetic_batch
from support.trainer_fixtures import REPO

pytest.importorskip("deepspeed")

GLOBAL_BATCH, STEPS, CLASSES = 8, 3, 5
ENGINES = ("ddp", "zero1", "zero2", "zero3")
ALGORITHMS = ("rsc", "erm")
# (engine, algorithm, precision): fp32 with frozen BatchNorm statistics; bf16 autocast with
# BatchNorm training (its statistics in fp32: the case DeepSpeed's own bf16 mode fails on).
VARIANTS = ([(e, a, "no") for e in ENGINES for a in ALGORITHMS]
            + [(e, "rsc", "bf16") for e in ("ddp", "zero2", "zero3")])
def _train_variants(rank, world_size, out_dir):
    from rsc_dist.config import load_config
    from rsc_dist.trainer import build
    from rsc_dist.trainer.step import train_on_batch

    plan = SimpleNamespace(manifest=SimpleNamespace(num_classes=CLASSES), total_steps=STEPS, domains=("a", "b"),
                           source_indices=(0, 1),
                           local_forward_batch=GLOBAL_BATCH // world_size, global_forward_batch=GLOBAL_BATCH)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    results = {}
    for engine_name, algorithm, precision in VARIANTS:
        os.environ.clear()
        os.environ.update(base_env)
        if engine_name != "ddp":
            os.environ.update(deepspeed_launch_env(
                REPO / "launch" / "accelerate" / f"deepspeed_{engine_name}.yaml"))
        fresh_accelerate_state()
        config = load_config("demo", [f"--algorithm={algorithm}", "--rsc.mode=spatial+channel",
                                      "--rsc.p_batch=0.5", "--optim.lr=0.05", "--schedule.warmup_steps=0",
                                      f"--model.freeze_bn={precision == 'no'}", "--model.channels_last=false",
                                      f"--train.mixed_precision={precision}", "--wandb.mode=disabled"])
        accelerator = build.make_accelerator(config, Path(out_dir) / "unused")
        assert (accelerator.state.deepspeed_plugin is not None) == (engine_name != "ddp")
        if engine_name == "zero3":
            # Partition every parameter, the head's included: by default DeepSpeed keeps
            # parameters under 1e5 elements whole on every rank (the head is 512 x 5).
            zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
            zero["stage3_param_persistence_threshold"] = 0
        torch.manual_seed(0)
        trained = build.training_objects(config, plan, accelerator)
        model, optimizer = trained.model, trained.optimizer
        feature_dtypes = set()  # what the head receives: bf16 under autocast
        trained.network.head.register_forward_hook(
            lambda module, args, output: feature_dtypes.add(args[0].dtype))
        masks, started = [], time.perf_counter()
        for step in range(STEPS):
            images, labels = synthetic_batch(step, GLOBAL_BATCH, CLASSES)
            part = slice(rank * plan.local_forward_batch, (rank + 1) * plan.local_forward_batch)
            out, _ = train_on_batch(accelerator, trained, config, {"image": images[part], "label": labels[part]},
                                    step, 100)
            masks.append(out["mask"])
        seconds_per_step = (time.perf_counter() - started) / STEPS
        # Outside the head's forward, ZeRO-3 leaves each rank an empty placeholder of the
        # head weight (its slice lives elsewhere): what the masks' equality is about.
        head_weight = trained.network.head.fc.weight
        partitioned = head_weight.numel() == 0
        weights = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank
        results[engine_name, algorithm, precision] = {
            "weights": {k: v.detach().clone() for k, v in weights.items()} if rank == 0 else None,
            "masks": masks, "seconds_per_step": seconds_per_step, "partitioned": partitioned,
            "lr": [group["lr"] for group in optimizer.param_groups],
            "weight_dtypes": {p.dtype for p in model.parameters()}, "feature_dtypes": feature_dtypes}
        del model, optimizer, trained, accelerator
    torch.save(results, Path(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_zero_stages_reach_the_weights_of_ddp(tmp_path):
    run_on_ranks(_train_variants, 2, str(tmp_path), env_init=True, timeout=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    initial = _initial_weights()
    for algorithm in ALGORITHMS:
        reference = ranks[0]["ddp", algorithm, "no"]["weights"]
        moved = sum(not torch.allclose(initial[k], v) for k, v in reference.items() if v.is_floating_point())
        assert moved > 10, "training must change the weights for the comparison to mean anything"
        for engine_name in ENGINES[1:]:
            weights = ranks[0][engine_name, algorithm, "no"]["weights"]
            assert weights.keys() == reference.keys(), engine_name
            for name, value in reference.items():
                torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5,
                                           msg=f"{engine_name} {algorithm} {name}")
            for rank in ranks:  # the schedule reached the optimizer DeepSpeed steps with
                assert rank[engine_name, algorithm, "no"]["lr"] == rank["ddp", algorithm, "no"]["lr"]
    for rank in ranks:
        assert [rank[e, "rsc", "no"]["partitioned"] for e in ENGINES] == [False, False, False, True]
        ddp_masks = rank["ddp", "rsc", "no"]["masks"]
        assert any((m == 0).any() for m in ddp_masks), "the test must mask something to mean anything"
        for engine_name in ENGINES[1:]:
            for step, mask in enumerate(rank[engine_name, "rsc", "no"]["masks"]):
                assert torch.equal(mask, ddp_masks[step]), (engine_name, step)
    # bf16: DeepSpeed runs torch autocast with fp32 weights (build.use_deepspeed_mixed_precision)
    # and reduces gradients in fp32, as DDP's bf16 autocast does: the same weights.
    bf16_reference = ranks[0]["ddp", "rsc", "bf16"]["weights"]
    for engine_name in ("ddp", "zero2", "zero3"):
        for rank in ranks:
            # (ZeRO-3's saliency also calls the head, in fp32: rsc._autograd_saliency)
            assert torch.bfloat16 in rank[engine_name, "rsc", "bf16"]["feature_dtypes"], engine_name
            assert rank[engine_name, "rsc", "no"]["feature_dtypes"] == {torch.float32}, engine_name
        assert ranks[0][engine_name, "rsc", "bf16"]["weight_dtypes"] == {torch.float32}
        weights = ranks[0][engine_name, "rsc", "bf16"]["weights"]
        for name, value in bf16_reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"{engine_name} bf16 {name}")
    # For BENCHMARKS.md (pytest -s): the largest weight difference from DDP, and step times.
    for key, value in ranks[0].items():
        reference = ranks[0]["ddp", key[1], key[2]]["weights"]
        largest = max(float((value["weights"][k].double() - v.double()).abs().max()) for k, v in reference.items())
        print(f"deepspeed-equivalence {'/'.join(key)}: max |w - w_ddp| {largest:.3g}, "
              f"{value['seconds_per_step']:.3f} s/step")


def _initial_weights():
    from rsc_dist.models.build import build_model

    torch.manual_seed(0)
    return build_model("resnet18", CLASSES).state_dict()
