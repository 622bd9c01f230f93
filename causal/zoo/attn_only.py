"""An attention-only GPT-2: the toy model family the zoo ships.

It subclasses the HF GPT-2 classes so that loading, tokenization and the GPT-2
site adapter are exercised exactly as for a real checkpoint; only the MLP
sub-layer is removed (it contributes exactly zero to the residual stream).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel


class AttnOnlyConfig(GPT2Config):
    model_type = "attn-only-gpt2"


class ZeroMLP(nn.Module):
    """Stands in for the MLP so that `mlp_out` exists and is identically zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class AttnOnlyLMHeadModel(GPT2LMHeadModel):
    config_class = AttnOnlyConfig

    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        for block in self.transformer.h:
            block.ln_2 = nn.Identity()
            block.mlp = ZeroMLP()


AutoConfig.register(AttnOnlyConfig.model_type, AttnOnlyConfig)
AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyLMHeadModel)
