"""The paper's experiments (and notebook 05's), built on the general core.

* :mod:`~entk_helpers.experiments.modular`: modular-addition data, the paper's MLP and
  one-layer transformer, their training recipes and saved runs (notebooks 01, 02, 04);
* :mod:`~entk_helpers.experiments.frequencies`: Fourier frequencies of those models, and
  notebook 02's Table 2 blocks and Fig. 3 alignment over training;
* :mod:`~entk_helpers.experiments.grammar`: grammar-labelled text windows (notebook 03);
* :mod:`~entk_helpers.experiments.scoring`: per-label AP, AUROC and macros of directions;
* :mod:`~entk_helpers.experiments.baselines`: PCA and random baselines;
* :mod:`~entk_helpers.experiments.layer_runs`: per-layer directions of a language model,
  cached layer by layer;
* :mod:`~entk_helpers.experiments.superposition`: Toy Models of Superposition (notebook 05).
"""
