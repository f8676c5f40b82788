"""Which published protocol a run follows: ``run.protocol``, a label each preset pins and
results.json records, so a number says which table it may stand beside.

A label promises the settings that make the protocol what it is; ``check_settings`` refuses a
config that contradicts its label (a DomainBed 2020 number trained with live BatchNorm is not
one), and ``check_world_size`` refuses what cannot be computed exactly on several processes.
"""

from __future__ import annotations

import re

from rsc_dist.core.errors import ConfigError

VERSIONS = {
    "custom": "no published protocol (the default)",
    "rsc-paper": "the RSC paper's recipes, the authors' released code where the text and the code differ",
    "domainbed-2020": "DomainBed as published (Gulrajani & Lopez-Paz, ICLR 2021; its 2020 tables): torchvision's "
                      "ImageNet ResNet-50, BatchNorm frozen (freeze_bn)",
    "domainbed-2024": "DomainBed's defaults since 2024: timm's resnet50.ram_in1k weights (resnet50_augmix), "
                      "BatchNorm trained (freeze_bn false); exact on several processes only with model.sync_bn",
}
NAMES = tuple(VERSIONS)
DOMAINBED = ("domainbed-2020", "domainbed-2024")

# {protocol: {dotted setting: the value the protocol fixes}}
REQUIRED = {
    "domainbed-2020": {"model.freeze_bn": True},
    "domainbed-2024": {"model.freeze_bn": False},
}


def check_settings(protocol: str, flat: dict) -> None:
    """ConfigError when a setting (``flat``: the config as {dotted key: value}) contradicts the
    protocol the run is labelled with."""
    for key, value in REQUIRED.get(protocol, {}).items():
        if flat.get(key) != value:
            raise ConfigError(f"run.protocol={protocol} fixes {key}={str(value).lower()}; got {flat.get(key)!r} "
                              "(set run.protocol=custom for another recipe)")


def check_world_size(protocol: str, flat: dict, world_size: int) -> None:
    """What a DomainBed run cannot keep on several processes: its batch, data.batch_size per
    source domain and step, unless the global batch is fixed (data.batch_size is per process);
    and under DomainBed 2024, BatchNorm's statistics (each process would normalize by its own
    share of the batch) unless they are synchronized."""
    if protocol in DOMAINBED and world_size > 1 and not flat.get("data.global_batch_size"):
        batch = flat.get("data.batch_size")
        raise ConfigError(f"run.protocol={protocol}: DomainBed's batch is data.batch_size={batch} per source domain "
                          f"and step, but on {world_size} processes data.batch_size is per process ({batch} x "
                          f"{world_size} per domain); pass --data.global_batch_size={batch} x the number of source "
                          "domains, the same batch on any number of processes")
    if protocol == "domainbed-2024" and world_size > 1 and not flat.get("model.sync_bn"):
        raise ConfigError(f"run.protocol=domainbed-2024 trains BatchNorm statistics (freeze_bn false): on "
                          f"{world_size} processes each would normalize by its share of the batch, not by the "
                          "batch DomainBed normalizes by; pass --model.sync_bn=true (GPUs), or run one process")


def dataset_key(name: str) -> str:
    """How a dataset's name is matched against published tables and registries: 'PACS',
    'office_home', 'Office-Home' -> 'pacs', 'officehome'."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())
