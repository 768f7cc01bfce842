"""The HTTP layer: FastAPI routes (routes.py) over the serving logic (serving.py). See app.py."""

from r1serve.api.app import create_app

__all__ = ["create_app"]
