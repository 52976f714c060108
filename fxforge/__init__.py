"""fxforge: a compiler for PyTorch models."""
__version__ = "0.1.0"
