"""The model zoo: small models for examples, tests and benchmarks (`get_model("tiny-llama")`)."""
from fxforge.models.base import ZooModel
from fxforge.models.zoo import get_model, list_models, register_model

__all__ = ["ZooModel", "get_model", "list_models", "register_model"]
