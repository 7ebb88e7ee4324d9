"""The training app's building blocks (``python -m lightning_adapters.train``) and ``load_task`` for its runs."""

from lightning_adapters.app.outputs import load_task

__all__ = ["load_task"]
