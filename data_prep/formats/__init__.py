"""Source layouts the converter understands: format name -> scanner(src, options) -> Layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_prep.formats.domainnet import scan_domainnet
from data_prep.formats.folders import scan_imagefolder, scan_office_home, scan_vlcs
from data_prep.formats.imagenet import scan_imagenet, scan_imagenet_sketch
from data_prep.formats.pacs import scan_pacs
from data_prep.records import Layout


@dataclass(frozen=True)
class ScanOptions:
    val_fraction: float = 0.1  # share of each (domain, class) held out as "val" where no split files exist
    seed: int = 0


FORMATS: dict[str, Callable[[Path, ScanOptions], Layout]] = {
    "pacs": scan_pacs,
    "vlcs": scan_vlcs,
    "office_home": scan_office_home,
    "domainnet": scan_domainnet,
    "imagefolder": scan_imagefolder,
    "imagenet": scan_imagenet,
    "imagenet_sketch": scan_imagenet_sketch,
}
