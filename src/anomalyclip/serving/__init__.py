"""The HTTP service behind ``anomalyclip serve``: a JSON API and a browser page."""

from anomalyclip.serving.app import ServiceSettings, create_app

__all__ = ["ServiceSettings", "create_app"]
