"""Where things are in a decoder-only ``transformers`` causal LM: its blocks, final norm, weights.

Nothing here depends on one architecture's code: the blocks are the base model's
``nn.ModuleList`` of ``config.num_hidden_layers`` modules, the final norm is the base model's
``norm`` / ``ln_f`` / ``final_layer_norm``, and a weight is named by its full name in
``model.named_parameters()``. The eNTK routes need the weight of an ``nn.Linear`` or of
GPT-2's ``Conv1D`` (output ``a W^T + b`` or ``a W + b``) inside one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass(frozen=True)
class WeightSite:
    """The parameter ``name`` of ``module`` (an ``nn.Linear`` or ``Conv1D``) in block ``layer``.

    The kernel does not depend on the weight's layout: ``Conv1D``'s ``(in, out)`` is the
    transpose of ``nn.Linear``'s ``(out, in)``, an isometry of parameter space.
    """

    name: str
    layer: int
    module: nn.Module


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model`` (a causal LM or its base model), in order."""
    base = getattr(model, "base_model", model)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    found = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise ValueError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected one ModuleList "
            f"of config.num_hidden_layers = {n_layers} modules in its base model, found "
            f"{len(found)}. entk_helpers.lm supports decoder-only transformers causal LMs.")
    return found[0]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the base model applies after its last block (``last_hidden_state`` is normed)."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise ValueError(f"cannot find the final norm of {type(base).__name__}: none of the "
                     f"attributes {FINAL_NORM_NAMES}")


def block_names(model: nn.Module) -> list[str]:
    """Full module names of the blocks, e.g. ``["model.layers.0", ...]``."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in blocks(model)]


def layer_weight(model: nn.Module, layer: int, path: str) -> str:
    """Full parameter name of ``path`` inside block ``layer``, e.g.
    ``layer_weight(model, 16, "mlp.down_proj")`` -> ``"model.layers.16.mlp.down_proj.weight"``."""
    names = block_names(model)
    if not 0 <= layer < len(names):
        raise ValueError(f"layer={layer}: the model has blocks 0..{len(names) - 1}")
    path = path if path.endswith(".weight") else f"{path}.weight"
    name = f"{names[layer]}.{path}"
    if name not in dict(model.named_parameters()):
        head = names[layer] + "."
        inside = sorted(n.removeprefix(head) for n, p in model.named_parameters()
                        if n.startswith(head) and p.ndim == 2)
        raise ValueError(f"no parameter {name!r}; the 2-D weights of block {layer} are {inside}")
    return name


def locate_weight(model: nn.Module, name: str) -> WeightSite:
    """The block and module of the parameter ``name`` (its full name in ``named_parameters()``).

    Raises:
        ValueError: when ``name`` is not a parameter, not inside a block, or not the weight of
            an ``nn.Linear`` / ``Conv1D``.
    """
    params = dict(model.named_parameters())
    if name not in params:
        close = [n for n in params if n.endswith("." + name)][:4]
        raise ValueError(f"weight={name!r} is not a parameter of the model; give its full name "
                         f"in model.named_parameters(), e.g. {close or list(params)[:2]}")
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    inside = [i for i, block in enumerate(block_names(model))
              if owner_name.startswith(block + ".")]
    if not inside:
        raise ValueError(f"weight={name!r} is not inside a decoder block ({block_names(model)[0]}"
                         " ...): the layer eNTK is for weights of one block")
    if leaf != "weight" or not (isinstance(owner, nn.Linear) or type(owner).__name__ == "Conv1D"):
        raise ValueError(f"weight={name!r} is a {leaf!r} of a {type(owner).__name__}; the layer "
                         "eNTK needs the weight of an nn.Linear or Conv1D (e.g. mlp.down_proj, "
                         "self_attn.o_proj, GPT-2's c_proj)")
    return WeightSite(name, inside[0], owner)


def check_eager(model: nn.Module) -> None:
    """The tail's products take second derivatives through attention: eager attention only."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in ("eager", None):
        raise ValueError(
            f"the model uses attn_implementation={impl!r}; the layer eNTK differentiates twice "
            "through attention, which needs the eager implementation: load the model with "
            "AutoModelForCausalLM.from_pretrained(..., attn_implementation='eager') or call "
            "model.set_attn_implementation('eager')")
