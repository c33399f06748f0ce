"""Tiny random decoder LMs of five architectures, built offline from their configs (float64).

Norm weights and biases are drawn at random so that no norm or bias is trivially 1 or 0.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, WIDTH, LAYERS = 50, 32, 3
ARCHITECTURES = ("gpt2", "llama", "qwen2", "gpt_neox", "gemma3_text")
# per architecture: (an MLP weight, the attention output projection, an attention input)
WEIGHTS = {
    "gpt2": ("mlp.c_proj", "attn.c_proj", "attn.c_attn"),
    "llama": ("mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj"),
    "qwen2": ("mlp.up_proj", "self_attn.o_proj", "self_attn.k_proj"),
    "gpt_neox": ("mlp.dense_4h_to_h", "attention.dense", "attention.query_key_value"),
    "gemma3_text": ("mlp.gate_proj", "self_attn.o_proj", "self_attn.q_proj"),
}


def tiny_model(kind: str, layers: int = LAYERS, seed: int = 0, sliding_last: bool = False
               ) -> nn.Module:
    """A random ``kind`` causal LM: width 32, 50 tokens, ``layers`` blocks, eager attention.

    ``sliding_last``: Gemma-3 only, the last block's attention a sliding window too."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, attn_implementation="eager", bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    rope = dict(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=layers,
                max_position_embeddings=64)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=WIDTH, n_head=2,
                                                 n_positions=64, **common))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                                   **rope, **common))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                                   **rope, **common))
    elif kind == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(num_attention_heads=4, **rope, **common))
    elif kind == "gemma3_text":
        types = ["sliding_attention"] * (layers - 1) + [
            "sliding_attention" if sliding_last else "full_attention"]
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
            sliding_window=4, layer_types=types, **rope, **common))
    else:
        raise ValueError(kind)
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name:
                p.normal_(0.5, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.requires_grad_(False)
    assert model.config.model_type == kind
    return model


def hidden_jacobian(model: nn.Module, ids: torch.Tensor, weight: str) -> torch.Tensor:
    """(N*d, P) Jacobian of ``base_model(ids).last_hidden_state[:, -1]`` w.r.t. ``weight``,
    by ``torch.autograd.functional.jacobian`` through the unmodified model."""
    base = model.base_model
    name = weight.removeprefix(model.base_model_prefix + ".")
    W = dict(base.named_parameters())[name].detach()

    def hidden(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(base, {name: w}, (ids,), {"use_cache": False})
        return out.last_hidden_state[:, -1]

    return torch.autograd.functional.jacobian(hidden, W).reshape(ids.shape[0] * WIDTH, -1)


def logit_jacobian(model: nn.Module, ids: torch.Tensor, weight: str) -> torch.Tensor:
    """(N*V, P) Jacobian of all last-position logits w.r.t. ``weight``."""
    W = dict(model.named_parameters())[weight].detach()

    def logits(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {weight: w}, (ids,), {"use_cache": False})
        return out.logits[:, -1]

    return torch.autograd.functional.jacobian(logits, W).reshape(ids.shape[0] * VOCAB, -1)
