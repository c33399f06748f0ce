"""Notebook 03's scores at N = 1024 per dataset draw and layer, on the CPU (issue 14).

Two uses: how much of the eNTK-PCA difference is the dataset draw (several seeds, layers 16
and 17, written to dataset_draws.json), and layers the recorded full-mode run did not reach
(seed 0, the recorded run's dataset, written to layer_sweep_N1024.json; a layer at a time fits
a CPU session, and solved layers are cached).

For each draw seed: rebuild the N = 8 x n_per_class grammar dataset with that seed (the seed
orders each class's candidate pool, so other windows of the same corpus are drawn), solve the
layer eNTK of each layer (cached per layer under results/03_gemma_grammar_features/cache/), and
score eNTK, exact PCA and the paper's randomized ``pca_lowrank(q=25, niter=2)`` (several seeds)
with the paper's two macros. The split seed, Lanczos seed and every other setting stay those of
notebook 03. Writes the ``--out`` file in results/03_gemma_grammar_features/ after every draw
(a rerun resumes: built datasets and solved layers are read back from the cache).

    HF_HUB_OFFLINE=1 python scripts/gemma_dataset_draws.py --seeds 1 2 0 3
    HF_HUB_OFFLINE=1 python scripts/gemma_dataset_draws.py --seeds 0 --layers 15 14 \
        --out layer_sweep_N1024.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from entk_helpers.experiments.baselines import pca_lowrank_directions
from entk_helpers.experiments.grammar import build_dataset, load_corpus, load_tagger, tagger_id
from entk_helpers.experiments.layer_runs import solve_layers
from entk_helpers.experiments.scoring import (
    bootstrap_macro,
    family_macros,
    score_labels,
    stratified_split,
)
from entk_helpers.files import save_json
from entk_helpers.lm import load_gemma, sqrt_psd, unembedding_gram
from entk_helpers.notebook import default_device, results_dir

K, STEPS, SPLIT_SEED, LANCZOS_SEED = 25, 50, 0, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 0, 3])
    parser.add_argument("--n-per-class", type=int, default=128)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 17])
    parser.add_argument("--lowrank-seeds", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", default="dataset_draws.json",
                        help="file in results/03_gemma_grammar_features")
    args = parser.parse_args()
    out_dir = results_dir("03_gemma_grammar_features")
    target = out_dir / args.out
    record = json.loads(target.read_text()) if target.exists() else {"draws": {}}
    model, tokenizer, info = load_gemma(default_device())
    stories, corpus = load_corpus()
    nlp = load_tagger()
    s_half = sqrt_psd(unembedding_gram(model)).float()
    record.update({"what": __doc__.split("\n\n")[0], "model": info, "corpus": corpus,
                   "tagger": tagger_id(nlp), "N": 8 * args.n_per_class, "T": 64, "k": K,
                   "lanczos_steps": STEPS, "split_seed": SPLIT_SEED,
                   "pca_lowrank": {"q": K, "niter": 2, "seeds": list(range(args.lowrank_seeds))}})
    windows = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        data = build_dataset(model, tokenizer, stories, n_per_class=args.n_per_class, T=64,
                             seed=seed, model_source=info["source"], corpus_name=corpus,
                             cache_folder=out_dir / "cache", nlp=nlp)
        built = time.perf_counter() - t0
        solved = solve_layers(model, data.input_ids, args.layers, s_half,
                              folder=out_dir / "cache", model_source=info["source"], k=K,
                              steps=STEPS, seed=LANCZOS_SEED)
        train = stratified_split(data.pos, seed=SPLIT_SEED)
        draw = {"dataset_seconds": built, "prefix_seconds": solved["prefix_seconds"],
                "labels": list(data.labels), "dataset": data.info,
                "label_support": {k: int(v.sum()) for k, v in data.labels.items()},
                "layers": {}}
        for L, arr in solved["layers"].items():
            rows = {"entk": score_labels(arr["entk"], data.labels, train),
                    "pca": score_labels(arr["pca"], data.labels, train)}
            lowrank = [family_macros(score_labels(
                pca_lowrank_directions(arr["pca_input"], K, q=K, niter=2, seed=s).numpy(),
                data.labels, train)) for s in range(args.lowrank_seeds)]
            boot = bootstrap_macro({"entk": arr["entk"], "pca": arr["pca"]}, rows, data.labels,
                                   train, n_boot=args.n_boot, seed=SPLIT_SEED,
                                   family="macro_pos")
            draw["layers"][L] = {
                "entk": family_macros(rows["entk"]), "pca_exact": family_macros(rows["pca"]),
                "pca_lowrank_paper": lowrank,
                "bootstrap_macro_pos_auroc": boot,
                "per_label": {m: [r.__dict__ for r in rs] for m, rs in rows.items()},
                "solver": {"seconds": arr["seconds"], "route": arr["route"],
                           "memory_plan": arr["memory_plan"],
                           "max_residual": float(np.max(arr["residuals"])),
                           "read_back": arr["read_back"]},
            }
            e, p = draw["layers"][L]["entk"], draw["layers"][L]["pca_exact"]
            print(f"seed {seed} layer {L}: POS macro AUROC eNTK {e['macro_pos']['test_auroc']:.3f}"
                  f" PCA {p['macro_pos']['test_auroc']:.3f}", flush=True)
        windows[seed] = {tuple(x) for x in data.input_ids.tolist()}
        record["draws"][str(seed)] = draw
        save_json(record, target)
    if len(windows) > 1:  # how many windows two draws share (the corpus is small)
        seeds = sorted(windows)
        record["shared_windows"] = {f"{a}-{b}": len(windows[a] & windows[b])
                                    for i, a in enumerate(seeds) for b in seeds[i + 1:]}
        save_json(record, target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
