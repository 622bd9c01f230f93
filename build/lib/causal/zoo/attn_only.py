"""An attention-only GPT-NeoX: the toy model family the zoo ships.

It subclasses the HF GPT-NeoX classes so that loading, tokenization and the GPT-NeoX
site adapter are exercised exactly as for a real (Pythia) checkpoint; only the MLP
sub-layer is removed (it contributes exactly zero to the residual stream). GPT-NeoX
puts positions into queries and keys only (rotary), never into the residual stream, so
a trained model cannot tag values with positions and has to find earlier tokens by
content: the textbook previous-token + induction-head circuit.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM


class AttnOnlyConfig(GPTNeoXConfig):
    model_type = "attn-only-neox"


class ZeroMLP(nn.Module):
    """Stands in for the MLP so that `mlp_out` exists and is identically zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class AttnOnlyForCausalLM(GPTNeoXForCausalLM):
    config_class = AttnOnlyConfig

    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        for layer in self.gpt_neox.layers:
            layer.post_attention_layernorm = nn.Identity()
            layer.mlp = ZeroMLP()


AutoConfig.register(AttnOnlyConfig.model_type, AttnOnlyConfig)
AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM)
