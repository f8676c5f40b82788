"""The generic method suite's training, run inside spawned ranks (tests/test_method_suite.py).

Step level: every method trained through the trainer's own assembly and step
(build.training_objects, step.train_on_batch) on synthetic global batches laid out as the data
stream lays them out (balanced sampling: each source domain's share in turn, every image's
place in the global batch in ``order``), on 1 process, on 2 DDP ranks and on 2 ZeRO-2 ranks.
End to end: every method through ``rsc_dist.train.main`` on real shards, several runs in one
process group.
"""

from __future__ import annotations

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
                     more: tuple = ()) -> None:
    """Train every (name, extra overrides) variant under every engine ("ddp", "zero2", "zero3"),
    and the (engine, variant) pairs of ``more``; rank 0 saves each run's final state dict, or the
    refusal's message."""
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
    for engine, (name, extra) in [(engine, variant) for engine in engines for variant in variants] + list(more):
        os.environ.clear()
        os.environ.update(base_env)
        if engine != "ddp":
            os.environ.update(deepspeed_launch_env(REPO / "launch" / "accelerate" / f"deepspeed_{engine}.yaml"))
        fresh_accelerate_state()
        config = load_config("demo", suite_overrides(name) + list(extra))
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
        weights = accelerator.get_state_dict(trained.model)
        results[engine, name, tuple(extra)] = {
            "weights": {k: v.detach().clone() for k, v in weights.items()} if rank == 0 else None}
        del trained, accelerator
    torch.save(results, Path(out_dir, f"world{world_size}_rank{rank}.pt"))


def _overrides(extra) -> dict:
    return dict(arg[2:].split("=", 1) for arg in extra if arg.startswith("--") and "=" in arg)


def variant_image_size(extra) -> int:
    """The side of a variant's images: its --data.image_size (a ViT is built for one whose side
    its patch divides), else SIZE."""
    return int(_overrides(extra).get("data.image_size", SIZE))


def initial_weights(extra=()) -> dict:
    """The weights a variant starts from (seed 0, before any step): ResNet-18, or the backbone
    its overrides name (--model.arch, --data.image_size)."""
    from rsc_dist.models.build import build_model

    torch.manual_seed(0)
    return build_model(_overrides(extra).get("model.arch", "resnet18"), CLASSES,
                       image_size=variant_image_size(extra)).state_dict()


def run_trainer_jobs(rank: int, world_size: int, jobs: list, ports: list) -> None:
    """``rsc_dist.train.main(args)`` for each job in turn on these ranks (each job a new process
    group on its own port: the trainer ends its group when a run ends)."""
    from rsc_dist import train

    for args, port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)
        fresh_accelerate_state()
        train.main(list(args))
