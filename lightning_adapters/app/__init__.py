"""The training app behind ``python -m lightning_adapters.train``: Hydra config store, data, task and tracking."""
