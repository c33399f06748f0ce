"""Old import paths of modules that moved into :mod:`entk_helpers.experiments`.

``import entk_helpers.modular`` (and ``from entk_helpers import modular``) still work: a
meta-path finder hands back the module at its new place, the same object, with a
DeprecationWarning. Remove an entry when its old path has been deprecated for a release.
``entk_helpers.gemma`` was dissolved into :mod:`entk_helpers.lm` with new signatures, so its
import fails with a message that says where each name went.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {f"entk_helpers.{name}": f"entk_helpers.experiments.{name}"
         for name in ("baselines", "frequencies", "grammar", "layer_runs", "modular", "scoring",
                      "superposition")}


REMOVED = {"entk_helpers.gemma": (
    "entk_helpers.gemma was dissolved into entk_helpers.lm in 0.2: load_gemma, sqrt_psd and "
    "unembedding_gram are entk_helpers.lm's; LayerEntk.build(model, prefix, s_half) is "
    "LayerNTKOperator(model, prefix, output='logits', s_half=s_half); capture_prefix and "
    "layer_directions are keyed by the weight's full name, layer_weight(model, L, "
    "'mlp.down_proj'); paper_route_operator is ntk_operator(model.base_model, ids, params=..., "
    "select=lambda out: out.last_hidden_state[:, -1] @ s_half)")}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path."""

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname in REMOVED:
            raise ModuleNotFoundError(REMOVED[fullname], name=fullname)
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path will be "
                      "removed in 0.3)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new path has run already."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
