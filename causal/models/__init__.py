"""Loading HF models and mapping the language's site names onto them."""
from causal.models.adapter import ActivationFn, ModelAdapter, SiteInfo, adapter_for
from causal.models.load import LoadedModel, load_model, wrap_model

__all__ = ["ActivationFn", "LoadedModel", "ModelAdapter", "SiteInfo", "adapter_for", "load_model", "wrap_model"]
