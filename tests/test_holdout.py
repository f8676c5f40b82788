"""DomainBed's validation split drawn at load time (data.holdout_fraction): floor(n x fraction)
of EVERY domain, unstratified, seeded by (data.holdout_seed, domain); identical on any number
of ranks; training reads the in-split only, evaluation each split's samples exactly once."""

import json
from collections import Counter

import pytest

from data_prep.manifest import load_manifest
from rsc_dist.config import load_config
from rsc_dist.data import streams
from rsc_dist.data.augment import Augment
from rsc_dist.data.order import GroupOrder
from rsc_dist.trainer.plan import DataPlan, selected_samples
from rsc_dist.data.streams import EvalStream, make_loader
from support.trainer_fixtures import tiny_config

AUGMENT = Augment(24, (0.7, 1.0), True, 0.3, 0.1)


def plan(shards, tmp_path, world=1, **data):
    config = load_config(str(tiny_config(tmp_path, shards, data={"holdout_fraction": 0.2, **data})))
    return DataPlan(config, shards, world)


def members(refs) -> set:
    return {(ref.path, index) for ref in refs for index in ref.sample_indices().tolist()}


def all_samples(manifest, domain) -> set:
    return {(str(manifest.root / shard.file), i) for split in ("train", "val", "test")
            for shard in manifest.shards(domain, split) for i in range(shard.num_samples)}


def test_every_domain_is_split_by_domainbeds_rule(tiny_shards, tmp_path):
    manifest = load_manifest(tiny_shards)
    split = plan(tiny_shards, tmp_path).holdout
    assert set(split.splits) == set(manifest.domains)  # the target too
    for domain, parts in split.splits.items():
        n = manifest.num_samples(domain)  # every split the converter wrote, pooled
        inside, outside = members(parts.inside), members(parts.outside)
        assert len(outside) == int(n * 0.2) and not inside & outside  # DomainBed: int(len(env) * fraction)
        assert inside | outside == all_samples(manifest, domain)
    record = split.record()
    assert record["out_n"]["sketch"] == int(manifest.num_samples("sketch") * 0.2) and record["seed"] == 0


def test_the_split_depends_on_the_seed_only(tiny_shards, tmp_path):
    one = plan(tiny_shards, tmp_path, world=1)
    two = plan(tiny_shards, tmp_path, world=2)
    other_batch = plan(tiny_shards, tmp_path, world=2, sampling="balanced", batch_size=4)
    assert one.holdout.record() == two.holdout.record() == other_batch.holdout.record()
    reseeded = plan(tiny_shards, tmp_path, holdout_seed=1).holdout
    assert reseeded.record()["out_digest"] != one.holdout.record()["out_digest"]
    assert members(reseeded.splits["photo"].outside) != members(one.holdout.splits["photo"].outside)


def test_training_reads_the_in_split_only(tiny_shards, tmp_path):
    for sampling in ("merged", "balanced"):
        p = plan(tiny_shards, tmp_path, sampling=sampling)
        inside = set().union(*(members(p.holdout.splits[d].inside) for d in p.sources))
        seen = Counter()
        for g, refs in enumerate(p.groups.values()):
            order = GroupOrder(refs, seed=3, group=g, block_shards=2)
            located = order.locate(0, range(order.num_samples))  # one pass of the epoch's sequence
            seen.update((refs[shard].path, index) for shard, index in located)
        assert set(seen) == inside and set(seen.values()) == {1}  # each in-split sample once per pass
        assert p.validation_counts() == {d: p.holdout.splits[d].out_count for d in p.sources}


@pytest.mark.parametrize("world", [1, 2])
def test_evaluation_reads_each_split_once_across_ranks(tiny_shards, tmp_path, world):
    p = plan(tiny_shards, tmp_path, world=world)
    manifest = load_manifest(tiny_shards)
    sets = p.evaluation_sets()
    assert set(sets) == {"val", "target", "target_out"}
    for role, refs in sets.items():
        urls, selection = selected_samples(refs)
        seen = Counter()
        for rank in range(world):
            stream = EvalStream(urls, rank=rank, world_size=world, augment=AUGMENT, batch_size=5, selection=selection)
            for batch in make_loader(stream, 0, pin_memory=False):
                seen.update(manifest.domains[d] for d in batch["domain"].tolist())
        expected = Counter()
        for ref in refs:
            expected[ref.path.split("/")[-2]] += ref.size
        assert seen == expected, role  # every selected sample of the role once, no other
    assert {r.path.split("/")[-2] for r in sets["target"] + sets["target_out"]} == set(p.targets)


def test_a_selection_yields_exactly_the_listed_samples(tiny_shards):
    manifest = load_manifest(tiny_shards)
    url = str(manifest.root / manifest.shards("photo", "train")[0].file)
    keys = [sample["__key__"] for sample in streams._read_sequential([url])]
    wanted = frozenset({0, 2, len(keys) - 1})
    chosen = [s["__key__"] for s in streams._selected(streams._read_sequential([url]), {url: wanted})]
    assert chosen == [keys[i] for i in sorted(wanted)]


def test_a_run_with_the_holdout_records_it_and_its_targets_out_split(tiny_shards, tmp_path):
    """Through the trainer (with DomainBed's dropout on as well): the sources validate on their
    out-split, the target is reported on its in-split and evaluated on its out-split, and
    results.json records the split and keeps its layout."""
    from rsc_dist import train
    from rsc_dist.core import contracts

    config = tiny_config(tmp_path, tiny_shards, data={"image_size": 32, "workers": 0, "holdout_fraction": 0.2,
                                                       "holdout_seed": 4, "batch_size": 4},
                         model={"dropout": 0.5, "freeze_bn": True},
                         train={"max_steps": 2, "eval_every_steps": 2, "tracker": "none", "selection": "source_val_mean"})
    run_dir = tmp_path / "run"
    assert train.main(["--config", str(config), "--output_dir", str(run_dir)]) == 0
    results = json.loads((run_dir / contracts.RESULTS_FILE).read_text())
    assert contracts.layout_problems(results) == []
    split = plan(tiny_shards, tmp_path, holdout_seed=4).holdout.record()
    assert results["holdout"] == split and results["world_size"] == 1 and results["global_batch"] == 4
    last = results["last"]
    assert last["val_n"] == {d: split["out_n"][d] for d in ("cartoon", "painting", "photo")}
    assert last["target_n"] == {"sketch": split["in_n"]["sketch"]}
    assert last["target_out_n"] == {"sketch": split["out_n"]["sketch"]} and "sketch" in last["target_out_acc"]
    # rsc_dist.evaluate on best/ reproduces its numbers, the target's out-split as a row of its own.
    from rsc_dist import evaluate

    assert evaluate.main([str(run_dir / results["best_checkpoint"]), "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["per_domain"]
    best = results["best"]
    assert rows["sketch"]["role"] == "target (in-split)" and rows["sketch"]["top1"] == best["target_acc"]["sketch"]
    assert rows["sketch (out-split)"]["top1"] == best["target_out_acc"]["sketch"]
    assert rows["sketch (out-split)"]["n"] == best["target_out_n"]["sketch"]
