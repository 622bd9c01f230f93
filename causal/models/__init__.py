"""Loading HF models and mapping the language's site names onto them."""
from causal.models.adapter import ModelAdapter, adapter_for
from causal.models.load import LoadedModel, load_model

__all__ = ["LoadedModel", "ModelAdapter", "adapter_for", "load_model"]
