"""RSC: Representation Self-Challenging (Huang et al., ECCV 2020), as a method of the trainer.

The method itself lives in ``rsc_dist.methods.rsc_masks`` as pure tensor functions (docs/method.md's Steps
1-5); this class only connects them to the trainer: its config section, the per-step draws
(the spatial/channel mode of Step 2 and p_batch of Step 4, both functions of (seed, step)),
the mask applied to z inside the forward (Step 5: ``z * mask``, the mask a constant), the plain
cross-entropy on the masked logits (Eq. 1 of the paper with z replaced by the challenged
features), and the fraction of samples trained on masked features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from rsc_dist.core.errors import ConfigError
from rsc_dist.core.fields import setting
from rsc_dist.core.seeding import mix_seed
from rsc_dist.methods.base import Method
from rsc_dist.methods.rsc_masks import (
    DEFAULT_P_BATCH,
    DEFAULT_P_CHANNEL,
    DEFAULT_P_SPATIAL,
    draw_mode,
    masked_sample_fraction,
    p_batch_schedule,
    rsc_mask,
)
from rsc_dist.models.layouts import layout_of


@dataclass(frozen=True)
class RSCConfig:
    mode: Literal["spatial", "channel", "spatial+channel"] = setting(
        "spatial+channel", "what is muted; spatial+channel draws one of the two per step")
    strategy: Literal["top_gradient", "top_activation", "random"] = setting(
        "top_gradient", "how features are scored (top_gradient is the method; others are ablations)")
    p_spatial: float = setting(DEFAULT_P_SPATIAL, "fraction of locations muted per sample", check="fraction")
    p_channel: float = setting(DEFAULT_P_CHANNEL, "fraction of channels muted per sample", check="fraction")
    p_batch: float = setting(DEFAULT_P_BATCH, "fraction of the batch that trains on masked features",
                             check="fraction")
    p_batch_schedule: Literal["constant", "released"] = setting(
        "constant", "constant: p_batch; released: 0.3 + 0.2 per 10 epochs, clamped at 0.9")
    global_selection: bool = setting(True, "batch percentage over the global batch of all ranks")


class RSC(Method):
    name = "rsc"
    summary = "Representation Self-Challenging: mute the most predictive features, learn from the rest"
    Section = RSCConfig
    metrics = ("masked_fraction",)

    def __init__(self, settings: RSCConfig | None = None, context=None):
        super().__init__(settings, context)
        # Global batch selection (Step 4 over all ranks) needs the group and the largest local
        # batch, so the all-gather needs no size agreement; None selects within each rank.
        self.selection_group = self.context.process_group if self.settings.global_selection else None

    @classmethod
    def sweep_space(cls, preset):
        # DomainBed's RSC ranges: U(0, 0.5) for the feature and the batch drop factors; the
        # fractions rsc.mode uses, p_batch unless the released schedule replaces it.
        space = {}
        if "spatial" in preset["rsc.mode"]:
            space["rsc.p_spatial"] = {"uniform": [0.0, 0.5]}
        if "channel" in preset["rsc.mode"]:
            space["rsc.p_channel"] = {"uniform": [0.0, 0.5]}
        if preset["rsc.p_batch_schedule"] != "released":
            space["rsc.p_batch"] = {"uniform": [0.0, 0.5]}
        return space

    def check_context(self) -> None:
        super().check_context()
        if "spatial" in self.settings.mode and not self.context.locations_reach_logits:
            raise ConfigError(
                f"rsc.mode={self.settings.mode} mutes locations of the features z, but this backbone's head reads "
                "none of them (a class-token head on the last layer): the spatial mask could not change the "
                "logits. Use --rsc.mode=channel, or for a timm ViT --model.head_blocks=1 (z becomes the input of "
                "the last transformer block, whose patch tokens reach the class token; docs/method.md, \"RSC on "
                "tokens\")")

    def draws(self, step, steps_per_epoch, sample_ids):
        settings, seed = self.settings, self.context.seed
        schedule = p_batch_schedule(settings.p_batch_schedule, settings.p_batch)
        draws = {"mode": draw_mode(settings.mode, seed, step),
                 "p_batch": schedule(step // steps_per_epoch, step)}
        if settings.strategy == "random":
            if sample_ids is None:
                raise ValueError("rsc.strategy=random needs each sample's identity (the batch has no sample_id)")
            # Per sample and step, from the sample's identity in the global order: the random
            # scores then do not depend on how the global batch is split over ranks.
            draws["sample_seeds"] = sample_ids ^ mix_seed(seed, step)
        return draws

    def transform_features(self, z: Tensor, head, batch, draws):
        mask = rsc_mask(
            z,
            head,
            batch.labels,
            mode=draws.get("mode", "spatial"),
            p_spatial=self.settings.p_spatial,
            p_channel=self.settings.p_channel,
            p_batch=draws.get("p_batch", DEFAULT_P_BATCH),
            strategy=self.settings.strategy,
            sample_seeds=draws.get("sample_seeds"),
            process_group=self.selection_group,
            capacity=self.context.capacity,
        )
        # Step 5 (docs/method.md): the mask is a constant; gradients flow through z only. The
        # extras carry it as a picture (N, c, h, w), what the image grids draw.
        mode = draws.get("mode", "spatial")
        return z * mask, {"mask": layout_of(head).picture(mask, mode), "mask_mode": mode}

    def loss(self, logits, batch, extras):
        loss, _ = super().loss(logits, batch, extras)
        return loss, {"masked_fraction": masked_sample_fraction(extras["mask"])}
