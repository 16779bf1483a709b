"""Zero-shot visual anomaly detection and segmentation with AnomalyCLIP."""

from anomalyclip.config import AnomalyCLIPConfig

__all__ = ["AnomalyCLIPConfig"]
__version__ = "0.1.0"
