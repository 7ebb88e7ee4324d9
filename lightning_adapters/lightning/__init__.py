"""PyTorch Lightning integration: ``AdapterCallback``, ``AdapterMixin`` and method training hooks."""
