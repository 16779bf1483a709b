"""The service's HTTP routes, one :class:`fastapi.APIRouter` per concern.

Each module takes the service's state through :mod:`anomalyclip.serving.dependencies`
and never imports :mod:`anomalyclip.serving.app`, which includes the routers.
"""
