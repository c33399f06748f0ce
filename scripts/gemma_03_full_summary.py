"""Notebook 03's full-mode summary at N = 1024 from what has been run (issue 14).

No model is loaded. It assembles ``results/03_gemma_grammar_features/full_N1024/summary.json``
from:

* ``results/03_gemma_grammar_features/full_N1024_layers*/summary.json``: every recorded
  full-mode run of notebook 03 (``ENTK_FULL=1``, one folder per run, named after its layers;
  today layers 16 and 17, dataset seed 0). Their per-label rows are re-averaged with the
  paper's two macros (POS, morphology); where runs share a layer, the run with more layers is
  used;
* ``results/03_gemma_grammar_features/layer_sweep_N1024.json`` (``scripts/gemma_dataset_draws.py
  --seeds 0 --out layer_sweep_N1024.json``): further layers on the recorded run's dataset (the
  script refuses a sweep or run built on another dataset than the largest run's);
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
RUNS, SWEEP, DRAWS = "full_N1024_layers*", "layer_sweep_N1024.json", "dataset_draws.json"
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
# what the recorded runs and the sweep must share (their datasets) for their rows to be mixed
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


def dataset_facts(dataset: dict, label_support: dict, model: dict, corpus: str) -> dict:
    """What two runs must share for their rows to be mixed in one table."""
    return {**{f: dataset.get(f) for f in DATASET_FIELDS}, "label_support": label_support,
            "model": weights_id(model), "corpus": corpus}


def check_same_dataset(facts: dict, reference: dict, what: str) -> None:
    differ = [k for k in reference if facts.get(k) != reference[k]]
    if differ:
        raise SystemExit(f"{what} was not built on the recorded run's dataset (differs in "
                         f"{differ}); rebuild it with the recorded run's settings")


def run_layers(run: dict) -> list[int]:
    """The layers of a notebook-03 summary (``layers`` in the oldest recorded run)."""
    return sorted(int(L) for L in run.get("layers_run", run.get("layers", [])))


def recorded_runs(base: Path) -> list[tuple[str, dict]]:
    """Every full-mode run of notebook 03 under ``base``, the one with most layers first."""
    runs = [(f"{p.parent.name}/summary.json", json.loads(p.read_text()))
            for p in sorted(base.glob(f"{RUNS}/summary.json"))]
    if not runs:
        raise SystemExit(f"no full-mode run of notebook 03 in {base}/{RUNS}: run it with "
                         "ENTK_FULL=1 (and ENTK_03_LAYERS for a subset of layers) first")
    return sorted(runs, key=lambda run: -len(run_layers(run[1])))


def sweep_layers(sweep_file: Path, reference: dict) -> dict[int, dict]:
    """The sweep's seed-0 layers, after checking they were solved on the recorded dataset."""
    if not sweep_file.exists():
        return {}
    sweep = json.loads(sweep_file.read_text())
    draw = sweep["draws"].get("0")
    if draw is None:
        raise SystemExit(f"{sweep_file} has no seed-0 draw: run scripts/gemma_dataset_draws.py "
                         "--seeds 0 --out layer_sweep_N1024.json")
    check_same_dataset(dataset_facts(draw["dataset"], draw["label_support"], sweep["model"],
                                     sweep["corpus"]), reference, str(sweep_file))
    return {int(L): got for L, got in draw["layers"].items()}


def main() -> None:
    base = results_dir("03_gemma_grammar_features")
    runs = recorded_runs(base)
    old = runs[0][1]
    reference = dataset_facts(old["dataset"], old["label_support"], old["model"], old["corpus"])
    per_label: list[dict] = []
    per_layer: dict[int, dict] = {}
    solver: dict[int, dict] = {}
    for name, run in runs:
        check_same_dataset(dataset_facts(run["dataset"], run["label_support"], run["model"],
                                         run["corpus"]), reference, name)
        for L in run_layers(run):
            if L in per_layer:  # a run with more layers already gave it
                continue
            rows = [r for r in run["per_label"] if r["layer"] == L]
            per_label += rows
            per_layer[L] = {out: family_macros(_rows([r for r in rows if r["method"] == method]))
                            for method, out in (("entk", "entk"), ("pca", "pca_exact"))}
            # the first recorded run kept no PCA input: filled from the draws' seed 0 below
            per_layer[L]["pca_lowrank_paper"] = (
                run.get("per_layer", {}).get(str(L), {}).get("pca_lowrank_paper"))
            solver[L] = {"seconds": run["solver"][str(L)]["seconds"],
                         "route": run["solver"][str(L)]["route"], "source": name}
    recorded_layers = sorted(per_layer)

    for L, got in sorted(sweep_layers(base / SWEEP, reference).items()):
        if L in recorded_layers:  # a full-mode run is the source for its own layers
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
    diff: dict[int, dict[str, float]] = {}  # layer -> draw seed -> eNTK - exact PCA
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
                diff.setdefault(L, {"0": per_layer[L]["entk"]["macro_pos"]["test_auroc"]
                                    - per_layer[L]["pca_exact"]["macro_pos"]["test_auroc"]})
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
              for L, d in sorted(diff.items())}
    lowest = min(layers)
    missing_reason = (
        f"not run at N = 1024 yet: layer {lowest}, the lowest run, took "
        f"{solver[lowest]['seconds'] / 60:.0f} min for 50 Lanczos products "
        f"({solver[lowest]['source']}), and every layer below it has a longer tail, so costs "
        "more; the rest want a GPU")
    summary = {
        "what": __doc__.split("\n\n")[0],
        "source": {"recorded_runs": [f"results/03_gemma_grammar_features/{name}"
                                     for name, _ in runs],
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
            "layers": sorted(spread),
            "entk_minus_pca_exact_macro_pos_auroc": spread,
            "pca_exact_vs_lowrank_macro_pos_auroc": lowrank,
            "bootstrap_macro_pos_auroc": boot,
            "seed_0": "the recorded runs' dataset, macros from their per-label rows"},
        "bootstrap_as_recorded": {
            "values": {name: run.get("bootstrap_macro_auroc") for name, run in runs},
            "note": "as each run recorded it; full_N1024_layers16-17 took the mean over all 14 "
                    "labels (POS and morphology together), not the paper's macros"},
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
