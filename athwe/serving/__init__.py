"""The HTTP service over a trained run (FastAPI on uvicorn): `athwe serve`."""
from athwe.serving.app import Batcher, create_app, serve

__all__ = ["Batcher", "create_app", "serve"]
