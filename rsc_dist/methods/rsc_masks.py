"""RSC, the method, as pure tensor functions.

Representation Self-Challenging (Huang et al., ECCV 2020): at every training step find the
features the true-class logit depends on most, mute them, and learn from what is left.
The reference for every formula here is docs/method.md; comments cite its steps.

No loop, no Accelerator, no config objects, no module state: everything is a function of its
arguments, so a resumed or distributed run computes exactly what a single uninterrupted one
does. The model adapter that calls this lives in ``rsc_dist.models``.

    mask = rsc_mask(z, head, y, mode="spatial")            # one process
    mask = rsc_mask(z, head, y, mode="channel",            # N ranks, global batch selection
                    process_group=torch.distributed.group.WORLD)
    logits = head(z * mask)

z is a CNN's feature map (N, C, H, W) or any layout of rsc_dist.models.layouts (the head's
``layout``): a channels-last map, or a transformer's tokens (N, T, D), whose patch tokens are
the locations ("spatial" mode) and whose prefix tokens (class, register) are never muted
(docs/method.md, "RSC on tokens").

Hot-path rules kept here: no ``.item()``/``nonzero()`` (no host-device sync), no
``backward()``, no parameter ``.grad`` touched, no train/eval switch, one collective per step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rsc_dist.core.collectives import gather_rows
from rsc_dist.core.seeding import hashed_uniform, mix_seed
from rsc_dist.models.layouts import FeatureLayout, layout_of

Mode = Literal["spatial", "channel"]
Strategy = Literal["top_gradient", "top_activation", "random"]
MODES = ("spatial", "channel")
STEP_MODES = ("spatial", "channel", "spatial+channel")
STRATEGIES = ("top_gradient", "top_activation", "random")

# The method's default fractions (docs/method.md): the paper's 1/3 for locations and batch, the
# released code's 1/3.2 for channels. The config's defaults are these constants.
DEFAULT_P_SPATIAL = 1 / 3
DEFAULT_P_CHANNEL = 1 / 3.2
DEFAULT_P_BATCH = 1 / 3

# Step 4 (docs/method.md): confidence drops below this margin count as "no change".
CHANGE_MARGIN = 1e-4
# Padding value of the all-gathered change vector: real changes are >= 0.
_PAD = -1.0


# ---------------------------------------------------------------------------------------------
# Step 1: saliency


def _closed_form_weight(head: Callable[[Tensor], Tensor]) -> Tensor | None:
    """The head's class-weight matrix when the closed form applies, else None.

    It applies to a head that is global average pooling over z's locations and one linear
    layer: such a head names that layer ``closed_form_classifier`` (models.heads.PooledLinearHead;
    a timm head whose probe showed it, rsc_dist.models.timm_backbones). Under DeepSpeed ZeRO-3
    the weight is partitioned outside the head's own forward (an empty tensor on this rank), so
    there the autograd path, which runs inside the head, is used.
    """
    classifier = getattr(head, "closed_form_classifier", None)
    if classifier is None:
        return None
    weight = classifier.weight
    if weight.numel() == 0 or hasattr(weight, "ds_id"):
        return None
    return weight


def saliency(features: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor) -> Tensor:
    """``G = d(sum_i h(z)_{i, y_i}) / dz`` on a detached copy of ``z``, in z's shape.

    Closed form for a pooled linear head: ``W[y_i] / L`` at each of the L locations, 0 at
    prefix tokens; ``torch.autograd.grad`` with ``inputs=z_copy`` for any other head, which
    leaves every parameter's ``.grad`` alone and is DDP-safe.
    """
    weight = _closed_form_weight(head)
    if weight is not None:
        layout = layout_of(head)
        dtype = torch.promote_types(features.dtype, torch.float32)
        locations = math.prod(layout.location_shape(features))
        per_channel = weight.detach().to(dtype)[targets] / locations  # (N, C)
        at_locations = layout.location_mask(
            torch.ones(features.shape[0], *layout.location_shape(features), dtype=dtype, device=features.device),
            prefix_value=0.0)
        return (layout.channel_mask(per_channel) * at_locations).expand(features.shape)
    return _autograd_saliency(features, head, targets)


def _autograd_saliency(features: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor) -> Tensor:
    # In fp32 even under autocast, as the closed form is: saliency rounded to bf16 would pick
    # other locations and channels than the closed form does (e.g. under ZeRO-3, which takes
    # this path for the GAP + linear head).
    z_copy = features.detach().to(torch.promote_types(features.dtype, torch.float32)).requires_grad_(True)
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        logits = head(z_copy)
        true_class_sum = logits.gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(true_class_sum, inputs=z_copy)
    return grad.to(torch.promote_types(grad.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# Step 2: scores


def channel_and_spatial_scores(
    features: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    *,
    strategy: Strategy = "top_gradient",
    generator: torch.Generator | None = None,
    sample_seeds: Tensor | None = None,
    layout: FeatureLayout | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample channel scores (N, C) and location scores (N, *locations): (N, H, W) for a
    map, (N, L) over the patch tokens for tokens. ``layout``: the head's when None.

    A channel's score averages over every position of z (prefix tokens included: a class-token
    head's gradient lives there); location scores cover the locations only (Step 2).
    Scores are computed in at least float32 (never in bf16/fp16, where near-ties collapse).
    Strategy "random" draws from ``sample_seeds`` when given (each sample's scores a function of
    its own seed, so independent of how the batch is split over ranks), else from ``generator``.
    """
    layout = layout or layout_of(head)
    z = features.detach().to(torch.promote_types(features.dtype, torch.float32))
    positions, locations = layout.positions(z), layout.locations(z)  # (N, P, C), (N, L, C)
    grid = (z.shape[0], *layout.location_shape(z))
    if strategy == "top_gradient":
        weight = _closed_form_weight(head)
        if weight is not None:  # the mean over positions of the closed-form G, without materializing G
            s_channel = weight.detach().to(z.dtype)[targets] / positions.shape[1]
        else:
            s_channel = layout.positions(saliency(features, head, targets)).mean(dim=1).to(z.dtype)
        # Grad-CAM map, as the released code does: sum_c z * s_ch.
        s_spatial = torch.einsum("nlc,nc->nl", locations, s_channel).reshape(grid)
        return s_channel, s_spatial
    if strategy == "top_activation":
        return positions.mean(dim=1), locations.mean(dim=2).reshape(grid)
    if strategy == "random":
        n, c, count = z.shape[0], positions.shape[2], locations.shape[1]
        if sample_seeds is not None:
            seeds = sample_seeds.to(z.device, torch.int64)
            return (hashed_uniform(seeds, c, salt=1).to(z.dtype),
                    hashed_uniform(seeds, count, salt=2).to(z.dtype).view(grid))
        gen_device = generator.device if generator is not None else z.device
        s_channel = torch.rand((n, c), generator=generator, device=gen_device)
        s_spatial = torch.rand(grid, generator=generator, device=gen_device)
        return s_channel.to(z.device), s_spatial.to(z.device)
    raise ValueError(f"unknown RSC strategy {strategy!r}; expected one of {STRATEGIES}")


# ---------------------------------------------------------------------------------------------
# Step 3: feature mask


def drop_count(num_scores: int, fraction: float) -> int:
    """``k = ceil(n * p)`` clamped to ``n - 1`` (the index of the threshold in a descending sort)."""
    return min(math.ceil(num_scores * fraction), num_scores - 1)


def top_fraction_mask(scores: Tensor, fraction: float) -> Tensor:
    """1 everywhere except where a sample's score is strictly above its k-th largest (0-based).

    ``scores`` is (N, ...); the threshold of sample i is the value at index
    ``k = ceil(n * fraction)`` of its scores sorted in descending order. Ties at the threshold
    are kept (strict ``>``), so ``fraction = 0`` drops nothing.
    """
    flat = scores.flatten(1)
    k = drop_count(flat.shape[1], fraction)
    # (k+1)-th largest == (n-k)-th smallest; kthvalue avoids a full sort.
    threshold = flat.kthvalue(flat.shape[1] - k, dim=1, keepdim=True).values
    return (flat <= threshold).reshape(scores.shape)


def feature_mask(
    s_channel: Tensor, s_spatial: Tensor, mode: Mode, *, p_spatial: float, p_channel: float,
    layout: FeatureLayout | None = None,
) -> Tensor:
    """Boolean keep-mask broadcastable to z: for a NCHW map (N, 1, H, W) or (N, C, 1, 1); for
    tokens (N, T, 1) with the prefix tokens kept, or (N, 1, D)."""
    layout = layout or FeatureLayout()
    if mode == "spatial":
        return layout.location_mask(top_fraction_mask(s_spatial, p_spatial), prefix_value=True)
    if mode == "channel":
        return layout.channel_mask(top_fraction_mask(s_channel, p_channel))
    raise ValueError(f"unknown RSC mode {mode!r}; expected one of {MODES}")


# ---------------------------------------------------------------------------------------------
# Step 4: batch percentage


def true_class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """``softmax(logits)_{i, y_i}`` in at least float32 (bf16 logits would create ties)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)


def batch_threshold(change: Tensor, p_batch: float) -> Tensor:
    """``tau = sorted_desc(change)[j]``, ``j = clamp(round(N * p), N - 1)``, over the rows >= 0.

    Entries equal to ``_PAD`` (-1) are padding from the all-gather and are not counted in N.
    Python's ``round`` and ``torch.round`` both round half to even. Everything stays on the
    device: N is counted there, so this never synchronizes with the host.
    """
    valid = change >= 0
    n_global = valid.sum().to(torch.float64)
    j = torch.round(n_global * p_batch).clamp(max=n_global - 1).clamp(min=0).long()
    ordered = change.sort(descending=True).values  # padding sorts last
    return ordered.gather(0, j.reshape(1)).squeeze(0)


def gather_changes(change: Tensor, process_group, capacity: int | None) -> Tensor:
    """All-gather the per-sample confidence drops of every rank into one padded vector.

    One collective. Ranks may hold different numbers of samples: every rank pads to the same
    ``capacity`` (the largest local batch of any rank) with ``_PAD``. When ``capacity`` is not
    given it is agreed on with an extra all-reduce (a second collective and a host sync);
    the trainer always passes it.
    """
    if capacity is None:
        size = torch.tensor([change.shape[0]], device=change.device, dtype=torch.long)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=process_group)
        capacity = int(size.item())
    if change.shape[0] > capacity:
        raise ValueError(f"local batch of {change.shape[0]} exceeds the RSC gather capacity {capacity}")
    return gather_rows(change, process_group, capacity, _PAD)


def select_samples(
    before: Tensor,
    after: Tensor,
    p_batch: float,
    *,
    process_group=None,
    capacity: int | None = None,
) -> Tensor:
    """Boolean (N,): which samples keep their feature mask (Step 4).

    ``change_i = max(before_i - after_i - 1e-4, 0)``; sample i keeps its mask iff
    ``change_i > tau``. With a process group, tau is computed over the GLOBAL batch.
    """
    change = (before.float() - after.float() - CHANGE_MARGIN).clamp(min=0)
    pool = change if process_group is None else gather_changes(change, process_group, capacity)
    return change > batch_threshold(pool, p_batch)


# ---------------------------------------------------------------------------------------------
# Everything together


def rsc_mask(
    features: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    *,
    mode: Mode,
    p_spatial: float = DEFAULT_P_SPATIAL,
    p_channel: float = DEFAULT_P_CHANNEL,
    p_batch: float = DEFAULT_P_BATCH,
    strategy: Strategy = "top_gradient",
    generator: torch.Generator | None = None,
    sample_seeds: Tensor | None = None,
    process_group=None,
    capacity: int | None = None,
) -> Tensor:
    """The RSC mask of one step: 0/1 in ``features.dtype``, broadcastable to z.

    Args:
        features: the features z the head reads: a CNN's last feature map (N, C, H, W), any
            H x W, or another layout of rsc_dist.models.layouts (the head's ``layout``).
        head: any callable mapping z to logits (N, K). A pooled linear head (one that names its
            ``closed_form_classifier``) gets the closed-form saliency; anything else goes
            through ``torch.autograd.grad``.
        targets: ground-truth labels (N,), integers in [0, K).
        mode: "spatial" or "channel" (resolve "spatial+channel" per step with ``draw_mode``).
        p_spatial, p_channel: fraction of locations / channels muted per sample.
        p_batch: fraction of the batch that keeps its mask (Step 4); 0 masks no sample.
        strategy: "top_gradient" (the method), "top_activation" or "random" (ablations).
        generator: source of the scores for strategy "random" (when no ``sample_seeds``).
        sample_seeds: (N,) int64 per-sample seeds for strategy "random": each sample's scores
            depend on its seed only, so N ranks draw what one process draws.
        process_group: when given, the batch-percentage threshold is computed over the global
            batch of all ranks in the group (one all-gather); None selects within this rank.
        capacity: the largest local batch size of any rank; lets the all-gather skip a size
            agreement. Required for the no-sync path when ranks hold different batch sizes.

    The mask is a constant: no gradient flows through it (Step 5).
    """
    layout = layout_of(head)
    _check_inputs(features, targets, mode, strategy, (p_spatial, p_channel, p_batch), layout)
    targets = targets.long()
    with torch.no_grad(), same_randomness_per_call(head, features.device) as reset:
        reset()
        logits_full = head(features.detach())
        _check_logits(logits_full, features.shape[0], targets)
        reset()
        s_channel, s_spatial = channel_and_spatial_scores(
            features, head, targets, strategy=strategy, generator=generator, sample_seeds=sample_seeds,
            layout=layout)
        keep = feature_mask(s_channel, s_spatial, mode, p_spatial=p_spatial, p_channel=p_channel, layout=layout)
        keep_value = keep.to(features.dtype)
        reset()
        logits_masked = head(features.detach() * keep_value)
        selected = select_samples(
            true_class_probability(logits_full, targets),
            true_class_probability(logits_masked, targets),
            p_batch,
            process_group=process_group,
            capacity=capacity,
        )
        # Step 4: unselected samples see their full features.
        selected = selected.reshape(-1, *[1] * (features.dim() - 1))
        return torch.where(selected, keep_value, torch.ones_like(keep_value))


@contextlib.contextmanager
def same_randomness_per_call(head, device: torch.device):
    """Give every scoring pass of a stochastic head (AlexNet's dropout) the same random draw.

    Otherwise ``change_i = before_i - after_i`` would mostly measure two different dropout
    masks, not the feature mask. The RNG state is restored on exit, so the training forward
    that follows draws exactly what it would have drawn without RSC (the same dropout mask the
    scoring passes used). Deterministic heads skip this entirely.
    """
    stochastic = isinstance(head, nn.Module) and any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in head.modules()
    )
    if not stochastic:
        yield lambda: None
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device) if devices else None

        def reset() -> None:
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)

        yield reset


def masked_sample_fraction(mask: Tensor) -> Tensor:
    """Fraction of samples whose mask mutes anything (a device scalar, for logging)."""
    return (mask.flatten(1).amin(dim=1) < 1).float().mean()


# ---------------------------------------------------------------------------------------------
# Per-step choices that must be identical on every rank and after a resume


def draw_mode(mode: str, seed: int, step: int) -> Mode:
    """Resolve the step's mode. "spatial+channel" draws spatial with probability 1/2.

    The released code draws ``random.randint(0, 9) <= 4`` from unseeded global state; here the
    draw comes from a generator seeded by (seed, step), so all ranks agree without
    communicating and a resumed run repeats the draws of an uninterrupted one.
    """
    if mode in MODES:
        return mode  # type: ignore[return-value]
    if mode != "spatial+channel":
        raise ValueError(f"unknown RSC mode {mode!r}; expected one of {STEP_MODES}")
    generator = torch.Generator().manual_seed(mix_seed(seed, step))
    return "spatial" if int(torch.randint(0, 10, (1,), generator=generator)) <= 4 else "channel"


def released_p_batch(epoch: int, step: int = 0) -> float:
    """The released code's schedule: ``0.3 + (epoch // 10) * 0.2``, clamped below 1.

    The released code reaches 1.1 at epoch 40 and crashes with an index error; the threshold
    index is clamped anyway, but a fraction above 1 has no meaning, so it stops at 0.9.
    ``step`` is accepted so every schedule has the same (epoch, step) signature.
    """
    del step
    return min(0.3 + (epoch // 10) * 0.2, 0.9)


def constant_p_batch(value: float) -> Callable[[int, int], float]:
    """A schedule that always returns ``value`` (the paper's tables use 1/3)."""
    return lambda epoch, step: value


def p_batch_schedule(name: str, value: float) -> Callable[[int, int], float]:
    """Schedule by name: "constant" (uses ``value``) or "released"."""
    if name == "constant":
        return constant_p_batch(value)
    if name == "released":
        return released_p_batch
    raise ValueError(f"unknown p_batch schedule {name!r}; expected 'constant' or 'released'")


# ---------------------------------------------------------------------------------------------
# Input checks: clear messages instead of an index error deep inside a kernel


def _check_inputs(features: Tensor, targets: Tensor, mode: str, strategy: str, fractions,
                  layout: FeatureLayout | None = None) -> None:
    (layout or FeatureLayout()).check(features)
    if targets.dim() != 1 or targets.shape[0] != features.shape[0]:
        raise ValueError(
            f"targets must be (N,) with N = {features.shape[0]} matching features; "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer class indices; got dtype {targets.dtype}")
    if mode not in MODES:
        raise ValueError(
            f"unknown RSC mode {mode!r}; expected one of {MODES} "
            "(resolve 'spatial+channel' per step with draw_mode)"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown RSC strategy {strategy!r}; expected one of {STRATEGIES}")
    for name, value in zip(("p_spatial", "p_channel", "p_batch"), fractions):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {value}")


def _check_logits(logits: Tensor, n: int, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"head must return logits of shape (N={n}, K); got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if targets.device.type == "cpu":
        bad = targets[(targets < 0) | (targets >= num_classes)]
        if bad.numel():
            raise ValueError(f"labels out of range [0, {num_classes}): {bad.unique().tolist()}")
    else:  # checked on the device, without waiting for it
        torch._assert_async(
            ((targets >= 0) & (targets < num_classes)).all(),
            f"RSC: labels out of range [0, {num_classes})",
        )
