"""Notebook 03's full-mode summary at N = 1024 from what has been run (issue 14).

No model is loaded. It assembles ``results/03_gemma_grammar_features/full_N1024/summary.json``
from:

* ``results/03_gemma_grammar_features/full_N1024_layers16-17/summary.json``: the recorded
  full-mode run of notebook 03 (layers 16 and 17, dataset seed 0); its per-label rows are
  re-averaged with the paper's two macros (POS, morphology) instead of that run's mean over all
  labels;
* ``results/03_gemma_grammar_features/layer_sweep_N1024.json`` (``scripts/gemma_dataset_draws.py
  --seeds 0 --out layer_sweep_N1024.json``): further layers on the recorded run's dataset (the
  script refuses a sweep built on another dataset);
* ``results/03_gemma_grammar_features/dataset_draws.json`` (``scripts/gemma_dataset_draws.py``):
  other dataset draws at N = 1024, their macros, the paper's randomized PCA and the POS-macro
  bootstrap. Its seed 0 is the recorded run's dataset, checked against the recorded macros.

Layers never run at N = 1024 are listed with the reason. Table 3 (best layer per label, chosen
on train AP, reported on test) is taken over the layers that were run.

    python scripts/gemma_03_full_summary.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from entk_helpers.experiments.scoring import LabelScore, family_macros
from entk_helpers.files import save_json
from entk_helpers.notebook import results_dir

N_LAYERS = 18
RECORDED, SWEEP, DRAWS = ("full_N1024_layers16-17/summary.json", "layer_sweep_N1024.json",
                          "dataset_draws.json")
PAPER = {  # paper.md, section 3
    16: {"entk": {"macro_pos": {"test_auroc": .827, "test_ap": .523, "enrichment_at_quota": 3.875},
                  "macro_morphology": {"test_auroc": .783, "test_ap": .475}},
         "pca": {"macro_pos": {"test_auroc": .745, "test_ap": .409, "enrichment_at_quota": 3.094},
                 "macro_morphology": {"test_auroc": .743, "test_ap": .375}}},
    17: {"entk": {"macro_pos": {"test_auroc": .819, "test_ap": .464},
                  "macro_morphology": {"test_auroc": .776}},
         "pca": {"macro_pos": {"test_auroc": .775, "test_ap": .404},
                 "macro_morphology": {"test_auroc": .728}}},
}
# what must agree between the recorded run's dataset and a sweep's for their rows to be mixed
DATASET_FIELDS = ("N", "T", "seed", "n_candidates", "checked", "accepted", "thresholds")


def _rows(records: list[dict]) -> list[LabelScore]:
    fields = LabelScore.__dataclass_fields__
    return [LabelScore(**{k: v for k, v in r.items() if k in fields}) for r in records]


def best_layer_per_label(per_label: list[dict], method: str) -> list[dict]:
    """Table 3: for each label the layer with the highest train AP, its test metrics."""
    out = []
    for label in dict.fromkeys(r["label"] for r in per_label):
        cands = [r for r in per_label if r["label"] == label and r["method"] == method]
        out.append(max(cands, key=lambda r: r["train_ap"]))
    return out


def weights_id(model: dict) -> tuple[bool, str]:
    """(quantized, the GGUF's sha256 prefix): the model without its local conversion folder,
    whose name gained the converter's versions after the recorded run (same GGUF file)."""
    found = re.search(r"q4km-([0-9a-f]{12})", model["source"])
    return model["quantized"], found.group(1) if found else model["source"]


def sweep_layers(sweep_file: Path, recorded: dict) -> dict[int, dict]:
    """The sweep's seed-0 layers, after checking they were solved on the recorded dataset."""
    if not sweep_file.exists():
        return {}
    sweep = json.loads(sweep_file.read_text())
    draw = sweep["draws"].get("0")
    if draw is None:
        raise SystemExit(f"{sweep_file} has no seed-0 draw: run scripts/gemma_dataset_draws.py "
                         "--seeds 0 --out layer_sweep_N1024.json")
    ours, theirs = draw["dataset"], recorded["dataset"]
    differ = [f for f in DATASET_FIELDS if ours.get(f) != theirs.get(f)]
    differ += ["model"] if weights_id(sweep["model"]) != weights_id(recorded["model"]) else []
    differ += ["corpus"] if sweep["corpus"] != recorded["corpus"] else []
    if draw["label_support"] != recorded["label_support"]:
        differ.append("label_support")
    if differ:
        raise SystemExit(f"{sweep_file} was not built on the recorded run's dataset (differs in "
                         f"{differ}); rebuild it with the recorded run's settings")
    return {int(L): got for L, got in draw["layers"].items()}


def main() -> None:
    base = results_dir("03_gemma_grammar_features")
    old = json.loads((base / RECORDED).read_text())
    recorded_layers = sorted(int(L) for L in old["layers"])
    per_label = list(old["per_label"])
    per_layer: dict[int, dict] = {}
    solver = {int(L): {"seconds": s["seconds"], "route": s["route"], "source": RECORDED}
              for L, s in old["solver"].items()}
    for L in recorded_layers:
        per_layer[L] = {}
        for method, name in (("entk", "entk"), ("pca", "pca_exact")):
            rows = [r for r in per_label if r["layer"] == L and r["method"] == method]
            per_layer[L][name] = family_macros(_rows(rows))
        per_layer[L]["pca_lowrank_paper"] = None  # filled from the draws' seed 0 below

    for L, got in sorted(sweep_layers(base / SWEEP, old).items()):
        if L in recorded_layers:  # the recorded run is the source for its own layers
            continue
        for method in ("entk", "pca"):
            per_label += [{"layer": L, "method": method, **r} for r in got["per_label"][method]]
        per_layer[L] = {"entk": got["entk"], "pca_exact": got["pca_exact"],
                        "pca_lowrank_paper": got["pca_lowrank_paper"]}
        solver[L] = {"seconds": got["solver"]["seconds"], "route": got["solver"]["route"],
                     "source": SWEEP}
    layers = sorted(per_layer)
    table3 = {m: best_layer_per_label(per_label, m) for m in ("entk", "pca")}
    table3_macros = {m: family_macros(_rows(rs)) for m, rs in table3.items()}
    n_pos = sorted({r["n_pos_test"] for r in per_label if "=" not in r["label"]})

    draws_file = base / DRAWS
    draws = json.loads(draws_file.read_text())["draws"] if draws_file.exists() else {}
    diff = {L: {"0": per_layer[L]["entk"]["macro_pos"]["test_auroc"]
                - per_layer[L]["pca_exact"]["macro_pos"]["test_auroc"]} for L in recorded_layers}
    lowrank, boot = {}, {}
    for seed, draw in sorted(draws.items()):
        for L in recorded_layers:
            got = draw["layers"].get(str(L))
            if got is None:
                continue
            if seed == "0":  # the recorded run's dataset: same macros, plus what it did not keep
                want = per_layer[L]["entk"]["macro_pos"]["test_auroc"]
                if abs(got["entk"]["macro_pos"]["test_auroc"] - want) > 1e-9:
                    raise SystemExit(f"{draws_file}: seed 0 at layer {L} does not reproduce the "
                                     "recorded run; it was built on another dataset")
                per_layer[L]["pca_lowrank_paper"] = got["pca_lowrank_paper"]
            else:
                diff[L][seed] = (got["entk"]["macro_pos"]["test_auroc"]
                                 - got["pca_exact"]["macro_pos"]["test_auroc"])
            lowrank.setdefault(L, {})[seed] = {
                "pca_exact": got["pca_exact"]["macro_pos"]["test_auroc"],
                "pca_lowrank_paper": [x["macro_pos"]["test_auroc"]
                                      for x in got["pca_lowrank_paper"]]}
            boot.setdefault(L, {})[seed] = got["bootstrap_macro_pos_auroc"]
    spread = {L: {"seeds": sorted(d, key=int), "values": [d[s] for s in sorted(d, key=int)],
                  "min": min(d.values()), "max": max(d.values()),
                  "range": max(d.values()) - min(d.values()),
                  "sd": float(np.std(list(d.values()), ddof=1)) if len(d) > 1 else None}
              for L, d in diff.items()}
    lowest = min(layers)
    missing_reason = (
        f"no GPU was lent, and on the shared 2-core CPU layer {lowest} "
        f"alone took {solver[lowest]['seconds'] / 60:.0f} min (50 Lanczos products); every "
        "layer below it has a longer tail, so costs more")
    summary = {
        "what": __doc__.split("\n\n")[0],
        "source": {"recorded_run": f"results/03_gemma_grammar_features/{RECORDED}",
                   "layer_sweep": f"results/03_gemma_grammar_features/{SWEEP}",
                   "dataset_draws": f"results/03_gemma_grammar_features/{DRAWS}",
                   "assembled_by": "scripts/gemma_03_full_summary.py"},
        "N": old["N"], "T": old["T"], "model": old["model"], "corpus": old["corpus"],
        "dataset": {f: old["dataset"].get(f) for f in DATASET_FIELDS},
        "n_pos_test_per_class": n_pos,
        "layers_run": layers,
        "layers_missing": {L: missing_reason for L in range(N_LAYERS) if L not in layers},
        "solver": solver,
        "per_layer": per_layer,
        "table3_best_layer_per_label": {
            "layers_considered": layers, "chosen_on": "train AP", "reported_on": "test",
            "rows": table3, "macros": table3_macros},
        "paper": PAPER,
        "dataset_draws": {
            "layers": recorded_layers,
            "entk_minus_pca_exact_macro_pos_auroc": spread,
            "pca_exact_vs_lowrank_macro_pos_auroc": lowrank,
            "bootstrap_macro_pos_auroc": boot,
            "seed_0": "the recorded run (full_N1024_layers16-17), macros from its per-label rows"},
        "recorded_bootstrap_all_labels": {
            "values": old["bootstrap_macro_auroc"],
            "note": "mean over all 14 labels (POS and morphology together): not the paper's "
                    "macro; kept as recorded"},
        "per_label": per_label,
    }
    target = save_json(summary, base / "full_N1024" / "summary.json")
    for L in layers:
        e, p = per_layer[L]["entk"]["macro_pos"], per_layer[L]["pca_exact"]["macro_pos"]
        extra = f"; eNTK - PCA over draws {spread[L]['values']}" if L in spread else ""
        print(f"layer {L}: POS macro AUROC eNTK {e['test_auroc']:.3f} PCA {p['test_auroc']:.3f}"
              f" ({solver[L]['seconds'] / 60:.1f} min){extra}")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
