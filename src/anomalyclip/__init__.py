"""Zero-shot visual anomaly detection and segmentation with AnomalyCLIP."""

from anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.model import AnomalyCLIP, AnomalyOutput, AnomalyPrediction
from anomalyclip.preprocess import ImageLoadError, load_image

__all__ = [
    "AnomalyCLIP",
    "AnomalyCLIPConfig",
    "AnomalyOutput",
    "AnomalyPrediction",
    "ImageLoadError",
    "load_image",
]
__version__ = "0.1.0"
