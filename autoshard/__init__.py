"""autoshard: automatic parallelism planning and model transformation for PyTorch."""

__version__ = "0.1.0"
