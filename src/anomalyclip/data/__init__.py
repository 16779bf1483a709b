"""Anomaly detection datasets: one sample record, a reader per published layout.

::

    from anomalyclip.data import open_dataset, AnomalyTorchDataset

    dataset = open_dataset("data/mvtec")            # layout recognised; test split
    dataset.counts()                                # {"bottle": (20, 63), ...}
    loader = DataLoader(AnomalyTorchDataset(dataset, 518), batch_size=8)

See :mod:`anomalyclip.data.core` for the conventions (labels, masks, defects) and each
reader module for the layouts it reads. The readers need no torch;
:class:`AnomalyTorchDataset` (which does) loads on first use (PEP 562), so that building
the command line's parser, which lists :data:`READERS`, answers without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anomalyclip.data.core import (
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    DatasetError,
    Sample,
)
from anomalyclip.data.custom import read_csv_manifest, read_folder
from anomalyclip.data.detect import READERS, detect_layout, detect_layouts, open_dataset
from anomalyclip.data.industrial import (
    read_btad,
    read_dagm,
    read_dtd_synthetic,
    read_ksdd,
    read_mpdd,
    read_mvtec,
    read_visa,
)
from anomalyclip.data.medical import (
    read_br35h,
    read_brainmri,
    read_covid19,
    read_cvc_clinicdb,
    read_cvc_colondb,
    read_endo,
    read_headct,
    read_images_masks,
    read_isic2016,
    read_kvasir,
    read_tn3k,
)
from anomalyclip.data.meta import read_meta_json, write_meta_json

if TYPE_CHECKING:
    from anomalyclip.data.torch_dataset import AnomalyTorchDataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "READERS",
    "AnomalyDataset",
    "AnomalyTorchDataset",
    "DatasetError",
    "Sample",
    "detect_layout",
    "detect_layouts",
    "open_dataset",
    "read_br35h",
    "read_brainmri",
    "read_btad",
    "read_covid19",
    "read_csv_manifest",
    "read_cvc_clinicdb",
    "read_cvc_colondb",
    "read_dagm",
    "read_dtd_synthetic",
    "read_endo",
    "read_folder",
    "read_headct",
    "read_images_masks",
    "read_isic2016",
    "read_ksdd",
    "read_kvasir",
    "read_meta_json",
    "read_mpdd",
    "read_mvtec",
    "read_tn3k",
    "read_visa",
    "write_meta_json",
]


def __getattr__(name: str) -> Any:
    """:class:`AnomalyTorchDataset` on first use, importing torch only then."""
    if name != "AnomalyTorchDataset":
        raise AttributeError(f"module 'anomalyclip.data' has no attribute {name!r}")
    from anomalyclip.data.torch_dataset import AnomalyTorchDataset

    globals()[name] = AnomalyTorchDataset
    return AnomalyTorchDataset
