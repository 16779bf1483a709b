"""Visual anomaly detection and segmentation: AnomalyCLIP, MuSc and references, one seam.

The public names below load on first use (PEP 562), so that ``import anomalyclip.cli``
and ``anomalyclip --help`` answer without importing torch; ``from anomalyclip import
AnomalyCLIP`` works as if they were imported here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "AnomalyCLIP": "anomalyclip.methods.anomalyclip.model",
    "AnomalyOutput": "anomalyclip.methods.anomalyclip.model",
    "AnomalyCLIPConfig": "anomalyclip.methods.anomalyclip.config",
    "AnomalyPrediction": "anomalyclip.predictor",
    "NonFiniteScoreError": "anomalyclip.predictor",
    "Calibration": "anomalyclip.calibration",
    "calibrate": "anomalyclip.calibration",
    "InspectionResult": "anomalyclip.inspection.records",
    "InspectionSummary": "anomalyclip.inspection.records",
    "inspect": "anomalyclip.inspection.run",
    "ImageLoadError": "anomalyclip.preprocess",
    "load_image": "anomalyclip.preprocess",
    "MuSc": "anomalyclip.methods.musc.model",
    "MuScConfig": "anomalyclip.methods.musc.model",
    "create_musc": "anomalyclip.methods.musc.factory",
    "score_set": "anomalyclip.methods.musc.factory",
    "PredictorSpec": "anomalyclip.methods.assemble",
    "assemble": "anomalyclip.methods.assemble",
    "defect_mask": "anomalyclip.visualize",
    "overlay": "anomalyclip.visualize",
}
__all__ = [
    "AnomalyCLIP",
    "AnomalyCLIPConfig",
    "AnomalyOutput",
    "AnomalyPrediction",
    "Calibration",
    "ImageLoadError",
    "InspectionResult",
    "InspectionSummary",
    "MuSc",
    "MuScConfig",
    "NonFiniteScoreError",
    "PredictorSpec",
    "assemble",
    "calibrate",
    "create_musc",
    "defect_mask",
    "inspect",
    "load_image",
    "overlay",
    "score_set",
]

if TYPE_CHECKING:
    from anomalyclip.calibration import Calibration, calibrate
    from anomalyclip.inspection.records import InspectionResult, InspectionSummary
    from anomalyclip.inspection.run import inspect
    from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
    from anomalyclip.methods.anomalyclip.model import AnomalyCLIP, AnomalyOutput
    from anomalyclip.methods.assemble import PredictorSpec, assemble
    from anomalyclip.methods.musc.factory import create_musc, score_set
    from anomalyclip.methods.musc.model import MuSc, MuScConfig
    from anomalyclip.predictor import AnomalyPrediction, NonFiniteScoreError
    from anomalyclip.preprocess import ImageLoadError, load_image
    from anomalyclip.visualize import defect_mask, overlay


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalyclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
