"""Where each rank's share of the trained fp32 weights lives, and whole tensors from the shares.

An average is kept beside the weights the optimizer updates, element for element, so that no
step needs a collective:

- one process, DDP: every rank holds every parameter whole (the same values on every rank),
  and averages them whole;
- DeepSpeed ZeRO-1/2: the optimizer steps each rank's slice of the flat fp32 master weights;
  a parameter's part of that slice is DeepSpeed's ``param._hp_mapping`` (its fp32 fragment
  and where the fragment starts in the flattened parameter);
- ZeRO-3: each parameter's partition of the fp32 master weights (rank r holds elements
  [r * P, (r + 1) * P) of the flattened, padded parameter).

``Fragments.whole`` puts the shares together (one all-reduce of a zero-filled flat buffer
into which every rank wrote its elements, so each element is one rank's value plus zeros:
exact); ``Fragments.share`` cuts whole tensors back into this launch's shares (a checkpoint
holds whole tensors, so it loads on any number of ranks). Only the prediction network's
trainable parameters are averaged (``features.*``, ``head.*``; a method's own modules take no
part in prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

METHOD_PREFIX = "method."  # a method's own modules (network.method): not averaged


@dataclass(frozen=True)
class Place:
    """One parameter's share on this rank: ``numel`` elements of the flattened whole parameter
    from ``start`` (0 elements: this rank holds none of it)."""

    name: str
    shape: tuple[int, ...]
    start: int
    numel: int


class Fragments:
    """This rank's shares of the trainable prediction parameters of a prepared model."""

    def __init__(self, accelerator, model, zero_stage: int | None = None):
        self.module = accelerator.unwrap_model(model) if zero_stage is None else model.module
        self.zero_stage = zero_stage
        self.zero = accelerator.deepspeed_engine_wrapped.engine.optimizer if zero_stage is not None else None
        self.params = [(name, p) for name, p in self.module.named_parameters()
                       if p.requires_grad and not name.startswith(METHOD_PREFIX)]
        self.distributed = zero_stage is not None and dist.is_initialized() and dist.get_world_size() > 1
        self.places = [self._place(name, p) for name, p in self.params]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.params]

    def _place(self, name: str, param) -> Place:
        if self.zero_stage is None:
            return Place(name, tuple(param.shape), 0, param.numel())
        if self.zero_stage <= 2:
            shape = tuple(param.shape)
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                return Place(name, shape, 0, 0)
            return Place(name, shape, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
        shape = tuple(param.ds_shape)
        partition, _ = self.zero._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        rank = self.zero._get_param_partition_rank(param)
        start = rank * partition.numel()
        return Place(name, shape, start, max(0, min(partition.numel(), param.ds_numel - start)))

    def live(self) -> list[torch.Tensor]:
        """This rank's current fp32 shares (views of the weights the optimizer updates; 1-D under
        ZeRO, the parameters themselves otherwise). Read them, never write them."""
        if self.zero_stage is None:
            return [p.detach() for _, p in self.params]
        if self.zero_stage <= 2:
            out = []
            for (name, p), place in zip(self.params, self.places):
                mapping = getattr(p, "_hp_mapping", None)
                out.append(mapping.get_hp_fragment().detach().view(-1) if mapping is not None
                           else torch.empty(0, device=self._device()))
            return out
        out = []
        for (_, p), place in zip(self.params, self.places):
            partition, _ = self.zero._get_fp32_opt_state_partition(p, release_swap_buffers=False)
            out.append(partition.detach().view(-1)[:place.numel])
        return out

    def _device(self) -> torch.device:
        return self.params[0][1].device if self.params else torch.device("cpu")

    def copies(self) -> list[torch.Tensor]:
        """New tensors holding this rank's current shares (fp32)."""
        return [t.detach().clone(memory_format=torch.preserve_format).float() for t in self.live()]

    def whole(self, shares: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: whole fp32 tensor} from every rank's ``shares`` (a collective under ZeRO with
        several ranks: call on every rank). One process and DDP: the shares themselves."""
        if not self.distributed:
            if self.zero_stage is None:
                return {name: share for name, share in zip(self.names, shares)}
            return {place.name: share.view(place.shape) for place, share in zip(self.places, shares)}
        sizes = [_numel(place.shape) for place in self.places]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self._device())
        offset = 0
        for place, share, size in zip(self.places, shares, sizes):
            if place.numel:
                flat[offset + place.start: offset + place.start + place.numel] = share.view(-1)
            offset += size
        dist.all_reduce(flat)
        out, offset = {}, 0
        for place, size in zip(self.places, sizes):
            out[place.name] = flat[offset: offset + size].view(place.shape)
            offset += size
        return out

    def share(self, whole: dict[str, torch.Tensor], what: str = "the averaged weights") -> list[torch.Tensor]:
        """This rank's shares of whole tensors (new tensors on the weights' device)."""
        missing = [name for name in self.names if name not in whole]
        if missing:
            raise ValueError(f"{what} lack {len(missing)} parameter(s) of this model (e.g. {missing[0]})")
        out = []
        # Each share goes where its live weights are (ZeRO's optimizer offload keeps them on the CPU).
        for (name, p), place, live in zip(self.params, self.places, self.live()):
            value = whole[name]
            if tuple(value.shape) != place.shape:
                raise ValueError(f"{what}: {name} has shape {tuple(value.shape)}, this model {place.shape}")
            if self.zero_stage is None:
                out.append(value.to(live.device, torch.float32).clone(memory_format=torch.contiguous_format)
                           .to(memory_format=_format_of(p)))
            else:
                out.append(value.reshape(-1)[place.start: place.start + place.numel].to(live.device, torch.float32)
                           .clone())
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _format_of(tensor: torch.Tensor):
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
