"""The HTTP service behind ``anomalyclip serve``: a JSON API and a browser page."""

from anomalyclip.serving.app import create_app
from anomalyclip.serving.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
