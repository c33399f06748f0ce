"""``scripts/gemma_03_full_summary.py`` on copies of its committed inputs (no model).

The committed ``full_N1024/summary.json`` must be what the script assembles from the committed
runs, sweep and draws; and a sweep built on another dataset must be refused, not mixed in.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from entk_helpers.notebook import repo_root

SOURCE = repo_root() / "results" / "03_gemma_grammar_features"
INPUTS = ("full_N1024_layers16-17/summary.json", "layer_sweep_N1024.json", "dataset_draws.json")


def _script():
    spec = importlib.util.spec_from_file_location(
        "gemma_03_full_summary", repo_root() / "scripts" / "gemma_03_full_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    target = tmp_path / "03_gemma_grammar_features"
    for name in INPUTS:
        if not (SOURCE / name).exists():
            pytest.skip(f"{SOURCE / name} not recorded")
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SOURCE / name, target / name)
    monkeypatch.setenv("ENTK_RESULTS_DIR", str(tmp_path))
    return target


def test_the_committed_summary_is_what_the_script_assembles(tmp_path, monkeypatch):
    target = _copy_inputs(tmp_path, monkeypatch)
    _script().main()
    made = json.loads((target / "full_N1024" / "summary.json").read_text())
    committed = json.loads((SOURCE / "full_N1024" / "summary.json").read_text())
    assert made == committed, "rerun python scripts/gemma_03_full_summary.py and commit"


@pytest.mark.parametrize("change", ["label_support", "accepted", "model"])
def test_a_sweep_on_another_dataset_is_refused(tmp_path, monkeypatch, change):
    target = _copy_inputs(tmp_path, monkeypatch)
    sweep = json.loads((target / "layer_sweep_N1024.json").read_text())
    if change == "label_support":
        sweep["draws"]["0"]["label_support"]["NOUN"] += 1
    elif change == "accepted":
        sweep["draws"]["0"]["dataset"]["accepted"]["VERB"] -= 1
    else:
        sweep["model"]["source"] = sweep["model"]["source"].replace("q4km-a5fd3b", "q4km-000000")
    (target / "layer_sweep_N1024.json").write_text(json.dumps(sweep))
    with pytest.raises(SystemExit, match=f"differs in .*{change}"):
        _script().main()
    assert not (target / "full_N1024" / "summary.json").exists()
