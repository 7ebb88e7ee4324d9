"""One file per adapter method; each registers itself with ``lightning_adapters.registry``."""
