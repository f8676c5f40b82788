"""Source layouts the converter understands: format name -> scanner(src, options) -> Layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_prep.formats.domainnet import scan_domainnet
from data_prep.formats.folders import scan_imagefolder, scan_office_home, scan_vlcs
from data_prep.formats.imagenet import scan_imagenet, scan_imagenet_sketch
from data_prep.formats.pacs import scan_pacs
from data_prep.records import DEFAULT_VAL_FRACTION, Layout, ScanOptions  # noqa: F401 (re-exported)


FORMATS: dict[str, Callable[[Path, ScanOptions], Layout]] = {
    "pacs": scan_pacs,
    "vlcs": scan_vlcs,
    "office_home": scan_office_home,
    "domainnet": scan_domainnet,
    "imagefolder": scan_imagefolder,
    "imagenet": scan_imagenet,
    "imagenet_sketch": scan_imagenet_sketch,
}

# What each format accepts, in one line: quoted by every "layout not found" / "no images" error.
LAYOUTS: dict[str, str] = {
    "pacs": "{kfold,pacs_data/pacs_data,pacs_data,images,.}/{domain}/{class}/* with "
            "{domain}_{train,crossval,test}_kfold.txt anywhere under --src",
    "vlcs": "[VLCS/]{Caltech101,LabelMe,SUN09,VOC2007}/{class}/* or "
            "{CALTECH,LABELME,PASCAL,SUN}/{train,crossval,test}/{class}/*",
    "office_home": "[OfficeHomeDataset_10072016/]{Art,Clipart,Product,Real World}/{class}/*",
    "domainnet": "{domain}/{class}/* with {domain}_train.txt and {domain}_test.txt in --src",
    "imagefolder": "{domain}/{class}/**/* or {domain}/{train,crossval,val,test}/{class}/**/*",
    "imagenet": "[ILSVRC/Data/CLS-LOC/]{train,val}/nXXXXXXXX/* (val may be flat with a labels file), "
                "optional sketch/nXXXXXXXX/*",
    "imagenet_sketch": "sketch/nXXXXXXXX/* or nXXXXXXXX/*",
}


def layout_hint(fmt: str) -> str:
    return f"--format {fmt} reads {LAYOUTS[fmt]} (see data_prep/README.md, 'Source layouts')"
