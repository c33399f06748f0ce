"""The package layout: old import paths still resolve (with a warning), one array conversion."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from entk_helpers._arrays import as_tensor
from entk_helpers._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_is_the_same_object_at_its_old_path(old: str) -> None:
    code = (f"import warnings, importlib\nwarnings.simplefilter('error')\n"
            f"new = importlib.import_module({MOVED[old]!r})\n"
            f"try:\n    importlib.import_module({old!r})\nexcept DeprecationWarning as w:\n"
            f"    assert {MOVED[old]!r} in str(w), w\nelse:\n    raise SystemExit('no warning')\n"
            f"warnings.simplefilter('ignore')\nimport sys\n"
            f"assert importlib.import_module({old!r}) is new\n")
    # a fresh interpreter: this one may have imported the old path already
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_from_package_import_of_a_moved_module_warns_and_works() -> None:
    code = ("import warnings\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    from entk_helpers import modular\n"
            "from entk_helpers.experiments import modular as new\n"
            "assert modular is new and modular.ModularMLP\n"
            "assert any(issubclass(w.category, DeprecationWarning) for w in caught)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_results_module_still_exports_the_split_names() -> None:
    with pytest.warns(DeprecationWarning, match="entk_helpers.files"):
        results = importlib.reload(importlib.import_module("entk_helpers.results"))
    from entk_helpers import files, notebook
    assert results.save_json is files.save_json and results.full_mode is notebook.full_mode
    assert results.PaperComparison is notebook.PaperComparison


def test_as_tensor_takes_negative_strides_sequences_and_converts_on_request() -> None:
    reversed_view = np.arange(6.0).reshape(2, 3)[:, ::-1]
    got = as_tensor(reversed_view, torch.float64, "cpu")
    np.testing.assert_array_equal(got.numpy(), [[2, 1, 0], [5, 4, 3]])
    assert as_tensor([1, 2]).dtype == torch.float64
    t = torch.ones(3, requires_grad=True)
    assert not as_tensor(t).requires_grad and as_tensor(t).dtype == torch.float32
    same = torch.arange(3.0)
    assert as_tensor(same).data_ptr() == same.data_ptr()   # nothing to convert: no copy


def test_the_package_itself_imports_nothing_from_an_old_path() -> None:
    code = ("import importlib, pkgutil, warnings\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "import entk_helpers\n"
            "for info in pkgutil.walk_packages(entk_helpers.__path__, 'entk_helpers.'):\n"
            "    if info.name not in ('entk_helpers.results', 'entk_helpers._moved'):\n"
            "        importlib.import_module(info.name)\n")
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning:torch", "-c", code],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_dissolved_gemma_module_says_where_its_names_went() -> None:
    with pytest.raises(ModuleNotFoundError, match="LayerNTKOperator"):
        importlib.import_module("entk_helpers.gemma")
