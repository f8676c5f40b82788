"""Resuming a DeepSpeed ZeRO checkpoint on another number of ranks: consolidate and re-partition.

DeepSpeed loads ZeRO optimizer shards only on the data-parallel world size that wrote them
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported"), and its universal-checkpoint converter (ds_to_universal) wants client
state that Accelerate's save does not write and then reads Adam's exp_avg/exp_avg_sq
unconditionally: an SGD checkpoint stops it on the missing keys, and a converter taught to skip
them would drop the momentum. So here every rank reads all the shards of the checkpoint (they are on
the shared run folder) and rebuilds, for every parameter, its whole fp32 master weight and each
per-element optimizer state (SGD's momentum_buffer, Adam's exp_avg and exp_avg_sq), with the
layout DeepSpeed's own zero_to_fp32 uses for the weights. Each rank then writes its slice of
them into this launch's partitions, and the whole weights into the model. The param groups'
hyperparameters (the learning rate the schedule reached, momentum, ...), any per-group scalar
state (Adam's step) and the engine's step counters are the same on every rank and are copied.

The layout comes from zero_to_fp32's merge functions (module-private in DeepSpeed, pinned to
0.19.8 by constraints.txt; tests/test_deepspeed_elastic.py is what notices a change). Nothing is
approximated: the new partitions hold the bytes the old ones held, so the run
continues as if it had not been stopped (tests/test_deepspeed_elastic.py). A checkpoint this
cannot rebuild completely (an optimizer state of another shape, offloaded optimizer state, more
than one ZeRO-3 parameter group) raises ``ReshardError`` naming what is missing.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

OPTIMIZER_SHARD_GLOB = "*zero_pp_rank_*_optim_states.pt"


class ReshardError(RuntimeError):
    """A ZeRO checkpoint that cannot be re-partitioned exactly; the message says why."""


@dataclass
class WholeState:
    """A ZeRO checkpoint gathered from all its shards: per parameter name, its fp32 weight
    (key "fp32") and every per-element optimizer state, whole; what is not partitioned."""

    stage: int
    world_size: int
    params: dict[str, dict[str, torch.Tensor]]
    buffers: dict[str, torch.Tensor]
    param_groups: list[dict]  # the optimizer's hyperparameters per group (no "params")
    scalar_state: dict = field(default_factory=dict)  # per-group state that is not per element
    counters: dict = field(default_factory=dict)  # the engine's global_steps, global_samples, skipped_steps

    @property
    def element_keys(self) -> list[str]:
        first = next(iter(self.params.values()), {})
        return [key for key in first if key != "fp32"]


def shard_count(deepspeed_dir: Path) -> int:
    """How many ranks wrote the ZeRO checkpoint in ``deepspeed_dir`` (one optimizer shard each)."""
    return len(list(Path(deepspeed_dir).glob(OPTIMIZER_SHARD_GLOB)))


def _rank_of(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def read_whole_state(deepspeed_dir: Path) -> WholeState:
    """Gather a ZeRO-1/2/3 checkpoint folder (Accelerate's pytorch_model/) into whole tensors, on the CPU."""
    from deepspeed.utils import zero_to_fp32

    deepspeed_dir = Path(deepspeed_dir)
    shards = sorted(deepspeed_dir.glob(OPTIMIZER_SHARD_GLOB), key=_rank_of)
    if not shards or [_rank_of(p) for p in shards] != list(range(len(shards))):
        raise ReshardError(f"{deepspeed_dir} does not hold one ZeRO optimizer shard per rank 0..N-1")
    states = [torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"] for p in shards]
    stage, world_size = int(states[0]["zero_stage"]), len(shards)
    counts = states[0]["partition_count"]
    if (max(counts) if isinstance(counts, list) else counts) != world_size:
        raise ReshardError(f"{deepspeed_dir}: the shards say {counts} partitions but {world_size} files are there")
    model_file = deepspeed_dir / ("mp_rank_00_model_states.pt" if stage <= 2
                                  else "zero_pp_rank_0_mp_rank_00_model_states.pt")
    model_states = torch.load(model_file, map_location="cpu", weights_only=False)
    with _quiet():
        layout = zero_to_fp32.parse_model_states([str(model_file)])
    if model_states.get("frozen_param_shapes"):
        raise ReshardError(f"{model_file} has frozen parameters, which this re-partitioning does not handle")

    base_key = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
    if any(not isinstance(s[base_key], dict) for s in states):
        raise ReshardError(f"{deepspeed_dir} holds DeepSpeed's elastic optimizer-state layout, not the one "
                           "rsc_dist writes")
    param_groups = [{k: v for k, v in g.items() if k != "params"} for g in states[0][base_key]["param_groups"]]
    # The flat tensors the optimizer stepped, per rank and in the order of the fp32 groups: one
    # per param group under ZeRO-1/2, one per sub-group under ZeRO-3 (all in one param group).
    flat_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    if stage == 3 and len(param_groups) != 1:
        raise ReshardError(f"{deepspeed_dir}: ZeRO-3 with {len(param_groups)} optimizer param groups "
                           "(only one is re-partitioned)")
    flats = [list(s[flat_key]) for s in states]
    per_element: dict[str, list[list[torch.Tensor]]] = {"fp32": flats}
    scalar_state: dict = {}
    for rank, state in enumerate(states):
        base = state[base_key]
        order = [index for group in base["param_groups"] for index in group["params"]]
        if len(order) != len(flats[rank]):
            raise ReshardError(f"{shards[rank]}: {len(order)} optimizer tensors for {len(flats[rank])} fp32 partitions")
        # ZeRO-1/2 keep a group's padding at the end of the last rank's optimizer state; the
        # fp32 partitions were saved without it. ZeRO-3's partitions carry their padding.
        paddings = state.get("group_paddings") if stage <= 2 else None
        for position, index in enumerate(order):
            partition = flats[rank][position]
            size = partition.numel() + (paddings[position] if paddings else 0)
            for key, value in base["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == size:
                    per_element.setdefault(key, [[None] * len(flats[r]) for r in range(world_size)])
                    per_element[key][rank][position] = value[: partition.numel()]
                elif key in scalar_state and not _same(scalar_state[key], value):
                    raise ReshardError(f"{shards[rank]}: optimizer state {key!r} differs between partitions")
                else:
                    scalar_state[key] = value
    for key, groups in per_element.items():
        if any(t is None for rank_groups in groups for t in rank_groups):
            raise ReshardError(f"{deepspeed_dir}: optimizer state {key!r} is missing from some partitions")

    whole: dict[str, dict[str, torch.Tensor]] = {}
    for key, groups in per_element.items():
        gathered: dict = {}
        with _quiet():
            if stage <= 2:
                zero_to_fp32._zero2_merge_trainable_params(gathered, world_size, groups, layout,
                                                           states[0].get("param_alignment_paddings"))
            else:
                zero_to_fp32._zero3_merge_trainable_params(gathered, world_size, groups, layout)
        for name, tensor in gathered.items():
            whole.setdefault(name, {})[key] = tensor.contiguous().clone()
    counters = {k: model_states[k] for k in ("global_steps", "global_samples", "skipped_steps") if k in model_states}
    return WholeState(stage=stage, world_size=world_size, params=whole, buffers=layout[0].buffers,
                      param_groups=param_groups, scalar_state=scalar_state, counters=counters)


@contextlib.contextmanager
def _quiet():
    """zero_to_fp32 reports its progress on stdout and draws a progress bar on stderr, on every rank."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def load_repartitioned(engine, deepspeed_dir: Path) -> WholeState:
    """Load the ZeRO checkpoint in ``deepspeed_dir`` (written by any number of ranks) into
    ``engine``: call on every rank (ZeRO-3 gathers the weights, a collective)."""
    import deepspeed

    offload = [what for what, option in (("optimizer", engine.zero_offload_optimizer()),
                                         ("parameters", engine.zero_offload_param()))
               if option is not None and str(getattr(option, "device", "none")).split(".")[-1].lower() != "none"]
    if offload:
        raise ReshardError(f"ZeRO offload of the {' and '.join(offload)} is not re-partitioned")
    whole = read_whole_state(deepspeed_dir)
    stage = engine.zero_optimization_stage()
    params = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    if set(params) != set(whole.params):
        missing, unexpected = sorted(set(params) - set(whole.params)), sorted(set(whole.params) - set(params))
        raise ReshardError(f"{deepspeed_dir} holds other parameters than this model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    zero = engine.optimizer
    base = zero.optimizer
    if len(base.param_groups) != len(whole.param_groups):
        raise ReshardError(f"{deepspeed_dir}: {len(whole.param_groups)} optimizer param groups, this run has "
                           f"{len(base.param_groups)}")
    for group, saved in zip(base.param_groups, whole.param_groups):
        group.update(saved)  # the learning rate the schedule reached, momentum, weight decay
    flats = zero.single_partition_of_fp32_groups if stage <= 2 else zero.fp32_partitioned_groups_flat
    for index, flat in enumerate(flats):
        state = base.state[flat]
        for key in whole.element_keys:
            state.setdefault(key, torch.zeros_like(flat))  # lazily created by the optimizer; filled below
        group = base.param_groups[index if stage <= 2 else 0]
        for key, value in whole.scalar_state.items():
            state[key] = _scalar_state(key, value, group, flat.device)
    device = flats[0].device
    with torch.no_grad():
        if stage <= 2:
            for lp_params, flat in zip(zero.bit16_groups, flats):  # each parameter's slices of them
                deepspeed.utils.lazy_init_hp_params_optimizer_state(lp_params, flat, base.state)
            for name, param in params.items():
                saved = whole.params[name]
                deepspeed.utils.safe_set_full_fp32_param(param, saved["fp32"].to(device))
                for key in whole.element_keys:
                    deepspeed.utils.safe_set_full_optimizer_state(param, saved[key].to(device), key)
                param.copy_(saved["fp32"].to(param.dtype))  # whole on every rank under ZeRO-1/2
        else:
            for name, param in params.items():
                for key in ["fp32", *whole.element_keys]:
                    _set_zero3_partition(zero, param, whole.params[name][key].to(device),
                                         None if key == "fp32" else key)
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    for name, param in params.items():
                        param.copy_(whole.params[name]["fp32"].to(param.dtype))
        buffers = dict(engine.module.named_buffers())
        if set(buffers) != set(whole.buffers):
            raise ReshardError(f"{deepspeed_dir} holds other buffers than this model")
        for name, buffer in buffers.items():
            buffer.copy_(whole.buffers[name])
    for key, value in whole.counters.items():
        setattr(engine, key, value)
    return whole


def _scalar_state(key, value, group: dict, device):
    """A copy of a per-group scalar state where torch's Optimizer.load_state_dict would put it:
    Adam's step stays on the CPU unless the optimizer is capturable or fused."""
    if not torch.is_tensor(value):
        return value
    if key == "step" and not (group.get("capturable") or group.get("fused")):
        return value.clone()
    return value.clone().to(device)


def _set_zero3_partition(zero, param, value: torch.Tensor, optim_state_key: str | None) -> None:
    """This rank's slice of a whole ZeRO-3 parameter (or optimizer state) into its fp32 partition.

    Not DeepSpeed's safe_set_full_fp32_param: it cuts the slice out of the unpadded value, which
    fails on the last rank when the parameter does not divide evenly among the ranks."""
    partition, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                      optim_state_key=optim_state_key)
    rank = zero._get_param_partition_rank(param)
    padded = torch.zeros(partition.numel() * zero._get_param_partition_world_size(param),
                         dtype=partition.dtype, device=partition.device)
    padded[: value.numel()] = value.flatten()
    partition.copy_(padded.narrow(0, partition.numel() * rank, partition.numel()))
