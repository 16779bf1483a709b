"""Zero-shot visual anomaly detection and segmentation with AnomalyCLIP."""

from anomalyclip.calibration import Calibration, calibrate
from anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.inference import InspectionResult, InspectionSummary, inspect
from anomalyclip.methods.musc import MuSc, MuScConfig, create_musc, score_set
from anomalyclip.model import AnomalyCLIP, AnomalyOutput, AnomalyPrediction
from anomalyclip.predictor import NonFiniteScoreError
from anomalyclip.preprocess import ImageLoadError, load_image
from anomalyclip.visualize import defect_mask, overlay

__all__ = [
    "AnomalyCLIP",
    "Calibration",
    "InspectionResult",
    "InspectionSummary",
    "calibrate",
    "defect_mask",
    "inspect",
    "overlay",
    "AnomalyCLIPConfig",
    "AnomalyOutput",
    "AnomalyPrediction",
    "ImageLoadError",
    "NonFiniteScoreError",
    "load_image",
    "MuSc",
    "MuScConfig",
    "create_musc",
    "score_set",
]
__version__ = "0.1.0"
