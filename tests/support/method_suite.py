"""The generic method suite's training, run inside spawned ranks (tests/test_method_suite.py).

Step level: every method trained through the trainer's own assembly and step
(build.training_objects, step.train_on_batch) on synthetic global batches laid out as the data
stream lays them out (balanced sampling: each source domain's share in turn, every image's
place in the global batch in ``order``), on 1 process, on 2 DDP ranks and on 2 ZeRO-2 ranks.
End to end: every method through ``rsc_dist.train.main`` on real shards, several runs in one
process group.

Weight averaging never changes the trained weights, so two methods' runs also carry one (ERM
an EMA, CORAL a SWAD fed the validation losses SWAD_LOSSES), and their averaged weights, and
the BatchNorm statistics recomputed for ERM's average over the global batch, are compared
between world sizes and engines like the weights.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from support.deepspeed import deepspeed_launch_env, fresh_accelerate_state
from support.trainer_fixtures import REPO

DOMAINS, SOURCES, CLASSES = 4, 3, 5  # the manifest has 4 domains, 3 of them sources
PER_DOMAIN, STEPS, SIZE = 16, 6, 40  # global batch 48; 40 px gives ResNet-18 a 2 x 2 feature map


# A method's settings where its defaults would not show what it does within the suite's few
# steps: IRM and VREx switch to their penalty weight and reset the optimizer at step 2 (inside
# the 2-rank comparison, and the first step after the end-to-end runs' cut, so a resume lands on
# the switch); GroupDRO's weights move visibly. IRM's penalty grows with the square of the
# logits, which one SGD step at lr 0.05 from scratch blows up: at that rate it diverges (NaN by
# step 3) even at the weight 1 DomainBed uses before the switch, so IRM trains at lr 0.01 here.
# DANN and CDANN take both kinds of step, consecutive discriminator steps included, with the
# gradient penalty and the discriminator's seeded dropout.
METHOD_OVERRIDES = {
    "irm": ["--irm.anneal_steps=2", "--irm.penalty_weight=0.1", "--optim.lr=0.01"],
    "vrex": ["--vrex.anneal_steps=2"],
    "groupdro": ["--groupdro.eta=0.1"],
    **{name: [f"--{name}.d_steps_per_g=2", f"--{name}.grad_penalty=0.1", f"--{name}.mlp_dropout=0.1"]
       for name in ("dann", "cdann")},
}


def method_overrides(name: str) -> list[str]:
    return list(METHOD_OVERRIDES.get(name, ()))


AVERAGED = {"erm": ("--train.averaging=ema", "--averaging.ema_decay=0.5"),
            "coral": ("--train.averaging=swad", "--averaging.swad_n_converge=2", "--averaging.swad_n_tolerance=2")}
SWAD_LOSSES = {2: 1.0, 4: 0.5, 6: 0.9}  # after step: the loss an evaluation would have given SWAD
BN_BATCHES = (100, 101, 102)  # the global batches ERM's average recomputes its BatchNorm statistics on


def suite_overrides(name: str) -> list[str]:
    """The config every method runs with here: balanced sampling, frozen BatchNorm, fp32."""
    return [f"--algorithm={name}", "--data.sampling=balanced", "--model.freeze_bn=true", "--optim.lr=0.05",
            "--schedule.warmup_steps=0", "--rsc.p_batch=0.5", "--model.channels_last=false",
            "--train.mixed_precision=no", "--wandb.mode=disabled", *method_overrides(name)]


def global_batch(step: int, size: int = SIZE) -> dict:
    """Global batch ``step``: PER_DOMAIN samples of each source domain, in the stream's layout."""
    g = torch.Generator().manual_seed(1000 + step)
    n = PER_DOMAIN * SOURCES
    return {"image": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, CLASSES, (n,), generator=g),
            "domain": torch.arange(SOURCES).repeat_interleave(PER_DOMAIN),
            "sample_id": torch.randint(0, 2**62, (n,), generator=g),
            "order": torch.arange(n)}


def rank_share(batch: dict, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s share: its slice of each domain's part, as rsc_dist.data.order.rank_slice."""
    local = PER_DOMAIN // world_size
    index = torch.cat([torch.arange(d * PER_DOMAIN + rank * local, d * PER_DOMAIN + (rank + 1) * local)
                       for d in range(SOURCES)])
    share = {key: value[index] for key, value in batch.items()}
    share["order_span"] = PER_DOMAIN * SOURCES
    return share


def train_step_level(rank: int, world_size: int, out_dir: str, variants: list, engines: tuple,
                     more: tuple = (), averaging_engines: tuple = ()) -> None:
    """Train every (name, extra overrides) variant under every engine ("ddp", "zero2", "zero3"),
    the (engine, variant) pairs of ``more``, and the variants that carry an average under
    ``averaging_engines`` too ("zero3"); rank 0 saves each run's final state dict (and average),
    or the refusal's message."""
    from rsc_dist.config import load_config
    from rsc_dist.core.errors import ConfigError
    from rsc_dist.trainer import build
    from rsc_dist.trainer.step import train_on_batch

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    local = PER_DOMAIN * SOURCES // world_size
    plan = SimpleNamespace(manifest=SimpleNamespace(num_classes=CLASSES), total_steps=STEPS,
                           domains=tuple("abcd"[:DOMAINS]), source_indices=tuple(range(SOURCES)),
                           local_forward_batch=local,
                           global_forward_batch=PER_DOMAIN * SOURCES)
    results = {}
    runs = [(engine, variant) for engine in engines for variant in variants] + list(more)
    runs += [(engine, (name, ())) for engine in averaging_engines for name in AVERAGED if (name, ()) in variants]
    for engine, (name, extra) in runs:
        os.environ.clear()
        os.environ.update(base_env)
        if engine != "ddp":
            os.environ.update(deepspeed_launch_env(REPO / "launch" / "accelerate" / f"deepspeed_{engine}.yaml"))
        fresh_accelerate_state()
        averaging = AVERAGED.get(name, ()) if not extra else ()
        config = load_config("demo", suite_overrides(name) + list(extra) + list(averaging))
        accelerator = build.make_accelerator(config, Path(out_dir) / "unused")
        if engine == "zero3":
            # Partition every parameter: by default DeepSpeed keeps those under 1e5 elements
            # whole on every rank (all of a test model's).
            accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"][
                "stage3_param_persistence_threshold"] = 0
        torch.manual_seed(0)
        try:
            trained = build.training_objects(config, plan, accelerator)
        except ConfigError as refused:
            results[engine, name, tuple(extra)] = {"refused": str(refused)}
            continue
        for step in range(STEPS):
            batch = rank_share(global_batch(step, variant_image_size(extra)), rank, world_size)
            train_on_batch(accelerator, trained, config, batch, step, steps_per_epoch=100)
            if trained.averaging is not None and step + 1 in SWAD_LOSSES:
                trained.averaging.at_evaluation(step + 1, {"val_loss_mean": SWAD_LOSSES[step + 1]})
        weights = accelerator.get_state_dict(trained.model)
        results[engine, name, tuple(extra)] = {
            "weights": {k: v.detach().clone() for k, v in weights.items()} if rank == 0 else None}
        if trained.averaging is not None:
            results[engine, name, tuple(extra)].update(averaged_results(accelerator, trained, config, rank,
                                                                        world_size))
        del trained, accelerator
    torch.save(results, Path(out_dir, f"world{world_size}_rank{rank}.pt"))


def averaged_results(accelerator, trained, config, rank: int, world_size: int) -> dict:
    """The averaged weights (whole: a collective under ZeRO) and, for the EMA, the BatchNorm
    statistics of its network recomputed over BN_BATCHES on every rank."""
    from rsc_dist.averaging.batchnorm import batchnorm_layers, recompute_batchnorm
    from rsc_dist.trainer.averaged import averaged_network
    from rsc_dist.trainer.step import prepare_batch

    averager = trained.averaging
    averager.finish()
    averaged = {k: v.detach().clone() for k, v in averager.whole_average().items()}
    out = {"averaged": averaged if rank == 0 else None}
    if averager.kind == "ema":
        network = averaged_network(config, CLASSES, accelerator, trained.model, averaged)
        batches = [prepare_batch(config, rank_share(global_batch(b), rank, world_size), accelerator.device).images
                   for b in BN_BATCHES]
        group = torch.distributed.group.WORLD if world_size > 1 else None
        assert recompute_batchnorm(network, batches, group) == len(BN_BATCHES)
        out["bn"] = {f"{i}.{key}": getattr(layer, key).clone() for i, layer in enumerate(batchnorm_layers(network))
                     for key in ("running_mean", "running_var")}
    return out


def relative_l2(got: dict, expected: dict, prefix: str = "") -> float:
    """||got - expected|| / ||expected|| over the floating-point tensors whose names start with ``prefix``."""
    keys = [k for k, v in expected.items() if v.is_floating_point() and k.startswith(prefix)]
    difference = torch.cat([(got[k].double() - expected[k].double()).flatten() for k in keys])
    scale = torch.cat([expected[k].double().flatten() for k in keys])
    return float(difference.norm() / scale.norm())


def _overrides(extra) -> dict:
    return dict(arg[2:].split("=", 1) for arg in extra if arg.startswith("--") and "=" in arg)


def variant_image_size(extra) -> int:
    """The side of a variant's images: its --data.image_size (a ViT is built for one whose side
    its patch divides), else SIZE."""
    return int(_overrides(extra).get("data.image_size", SIZE))


@functools.lru_cache(maxsize=None)
def initial_weights(extra: tuple = ()) -> dict:
    """The weights a variant starts from (seed 0, before any step): ResNet-18, or the backbone
    its overrides name (--model.arch, --data.image_size); built once per variant, read only."""
    from rsc_dist.models.build import build_model

    torch.manual_seed(0)
    return build_model(_overrides(extra).get("model.arch", "resnet18"), CLASSES,
                       image_size=variant_image_size(extra)).state_dict()


def end_to_end_config(root: Path, shards: Path, **train) -> Path:
    """The end-to-end runs' preset: tiny shards at 32 px, balanced global batch 12, frozen
    BatchNorm, no tracker; ``train``: train.* settings on top."""
    from support.trainer_fixtures import tiny_config

    return tiny_config(root, shards, data={"image_size": 32, "sampling": "balanced", "global_batch_size": 12,
                                           "batch_size": 999, "workers": 0},
                       model={"freeze_bn": True}, optim={"lr": 0.02},
                       train={"tracker": "none", "agree_every_steps": 1, **train})


def run_trainer_jobs(rank: int, world_size: int, jobs: list, ports: list, configs: list | None = None) -> None:
    """``rsc_dist.train.main(args)`` for each job in turn on these ranks (each job a new process
    group on its own port: the trainer ends its group when a run ends). ``configs``: per job,
    None (DDP) or an accelerate DeepSpeed config file whose environment the job runs in."""
    from rsc_dist import train

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    for args, port, config_file in zip(jobs, ports, configs or [None] * len(jobs)):
        os.environ.clear()
        os.environ.update(base_env)
        if config_file is not None:
            os.environ.update(deepspeed_launch_env(Path(config_file)))
        os.environ["MASTER_PORT"] = str(port)
        fresh_accelerate_state()
        train.main(list(args))
