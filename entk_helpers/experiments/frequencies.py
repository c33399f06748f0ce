"""Key frequencies of a network trained on modular addition, found from its weights.

A transformer that groks ``(a + b) mod p`` uses only a few frequencies k of Z_p (Nanda et al.
2023): its token embedding is, up to noise, a sum of ``cos(2 pi k a / p)`` and
``sin(2 pi k a / p)`` columns at those k, and each MLP neuron reads one of them. The paper
reproduced here found the key frequencies by looking at a first run and typed them in; this
module finds them with a rule, in two independent ways, so a new seed needs no human:

- :func:`embedding_fourier_power`: the DFT of the token embedding over the token axis,
  power averaged over d_model, per frequency ``k = 1 .. (p-1)/2``.
- :func:`neuron_frequency_power`: per MLP neuron, the share of its activation's 2-D Fourier
  power over the ``(a, b)`` grid that each frequency explains; each neuron votes for its
  dominant frequency with the variance that frequency explains.
- :func:`key_frequencies`: the frequencies standing out of such a power profile, by the
  largest gap in the sorted log-powers (``rule="gap"``) or a robust threshold
  (``rule="mad"``: above the median by several median absolute deviations, in log space).

Limits: the rules assume a few frequencies dominate; on an untrained network (flat profile)
:func:`key_frequencies` raises rather than invent a choice.

The paper's analyses of the one-layer transformer (notebook 02) on top of these:
:func:`transformer_frequencies` (both methods on a trained model), :func:`author_axis_sum`
and :func:`table2_overlaps` (Table 2's two blocks), :func:`unembedding_ntk` /
:func:`unembedding_modes` (the ``W_U`` mean-logit eNTK in closed form),
:func:`alignment_over_training`, :func:`smoothed_peak` and :func:`half_final_epoch` (Fig. 3);
:func:`frequencies_holding` and :func:`family_power` measure how a network spreads its power
over the frequencies (notebooks 02 and 05).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from torch import Tensor

from .._arrays import as_tensor
from ..features import fourier_family, orthonormal_basis, subspace_overlap
from .modular import OneLayerTransformer, modular_addition_data, with_equals_token

RULES = ("gap", "mad")


def _frequencies(p: int) -> np.ndarray:
    return np.arange(1, (p - 1) // 2 + 1)


def embedding_fourier_power(W_E: Tensor | np.ndarray, p: int) -> np.ndarray:
    """Fourier power of the token embedding per frequency, averaged over d_model.

    Args:
        W_E: ``(vocab, d_model)`` token embedding; only the first ``p`` rows (the numbers
            0..p-1, not extra tokens such as "=") are used.
        p: the modulus.

    Returns:
        ``((p-1)//2,)`` float64: entry ``k-1`` is ``mean_d |sum_a W_E[a, d] e^{-2 pi i k a/p}|^2``
        for ``k = 1 .. (p-1)/2`` (frequency p-k carries the same power and is not repeated).
    """
    w = as_tensor(W_E, torch.float64, "cpu").numpy()
    if w.ndim != 2 or w.shape[0] < p:
        raise ValueError(f"W_E must be (vocab >= p, d_model); got shape {w.shape} for p={p}")
    spectrum = np.fft.fft(w[:p], axis=0)  # (p, d_model)
    return (np.abs(spectrum[_frequencies(p)]) ** 2).mean(axis=1)


def neuron_fourier_shares(hidden: Tensor | np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """How much of each neuron's activation over the ``(a, b)`` grid each frequency explains.

    The 2-D DFT of a neuron's (mean-removed) activation over ``(a, b)`` is split by frequency:
    k owns the modes ``(±k, 0)``, ``(0, ±k)`` and ``(±k, ±k)``, i.e. the terms in
    ``cos/sin(k a)``, ``cos/sin(k b)``, ``cos/sin(k (a ± b))`` and their products. Other
    modes (mixed frequencies, harmonics cross terms) belong to no single k.

    Args:
        hidden: ``(p*p, n_neurons)`` activations, rows in row-major order ``a * p + b``.
        p: the modulus.

    Returns:
        ``shares`` ``(n_neurons, (p-1)//2)``: fraction of the neuron's variance at each k
        (rows sum to at most 1), and ``variance`` ``(n_neurons,)``: each neuron's variance.
    """
    h = as_tensor(hidden, torch.float64, "cpu").numpy()
    if h.ndim != 2 or h.shape[0] != p * p:
        raise ValueError(f"hidden must be (p*p, n_neurons) = ({p * p}, n); got {h.shape}")
    grid = h.T.reshape(-1, p, p)
    grid = grid - grid.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(grid)) ** 2 / (p * p) ** 2  # (n, p, p); sums to the variance
    variance = power.sum(axis=(1, 2))
    shares = np.zeros((h.shape[1], len(_frequencies(p))))
    for i, k in enumerate(_frequencies(p)):
        axis = [k, p - k]
        own = sum(power[:, x, 0] + power[:, 0, x] for x in axis)
        own = own + sum(power[:, x, y] for x in axis for y in axis)
        shares[:, i] = own / np.maximum(variance, 1e-300)
    return shares, variance


def neuron_frequency_power(hidden: Tensor | np.ndarray, p: int) -> np.ndarray:
    """Frequency profile of an MLP layer: each neuron votes for its dominant frequency.

    A neuron's vote is the variance its dominant frequency explains (share x variance), so
    dead or noisy neurons count little and harmonics, which never dominate a neuron, get
    no votes.

    Args:
        hidden: ``(p*p, n_neurons)`` activations over all inputs (row ``a * p + b``).
        p: the modulus.

    Returns:
        ``((p-1)//2,)`` float64 votes per frequency ``k = 1 .. (p-1)/2``.
    """
    shares, variance = neuron_fourier_shares(hidden, p)
    dominant = shares.argmax(axis=1)
    votes = np.zeros(shares.shape[1])
    np.add.at(votes, dominant, shares.max(axis=1) * variance)
    return votes


def key_frequencies(
    power: Tensor | np.ndarray,
    *,
    rule: str = "gap",
    min_ratio: float = 3.0,
    n_mads: float = 5.0,
) -> list[int]:
    """The frequencies standing out of a power profile, found by a rule (no hand-picked list).

    Args:
        power: ``((p-1)//2,)`` non-negative power per frequency ``k = 1 ..`` (entry k-1).
        rule: ``"gap"``: sort the powers, cut at the largest ratio between consecutive ones
            among cuts that keep at most half the frequencies; ``"mad"``: keep frequencies
            whose log-power exceeds the median log-power by ``n_mads`` median absolute
            deviations (scaled to a normal's standard deviation). With few frequencies the
            unused ones' scattered log-powers inflate the MAD: on a grokked p = 29
            transformer (14 frequencies) three keys standing out by x30 missed 5 MADs.
        min_ratio: ``"gap"`` only: the cut must separate powers by at least this factor.
        n_mads: ``"mad"`` only: the threshold in robust standard deviations.

    Returns:
        The key frequencies, sorted ascending.

    Raises:
        ValueError: when nothing stands out (e.g. a flat profile of an untrained network).
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; choose one of {RULES}")
    values = as_tensor(power, torch.float64, "cpu").numpy()
    if values.ndim != 1 or values.size < 3 or np.any(values < 0):
        raise ValueError("power must be a 1-D non-negative profile over at least 3 frequencies")
    logs = np.log(np.maximum(values, 1e-300 + values.max() * 1e-12))
    order = np.argsort(logs)[::-1]
    if rule == "gap":
        gaps = logs[order[:-1]] - logs[order[1:]]
        allowed = gaps[: values.size // 2]
        cut = int(np.argmax(allowed))
        if allowed[cut] < np.log(min_ratio):
            raise ValueError(f"no gap of at least {min_ratio}x among the sorted powers (largest "
                             f"{np.exp(allowed[cut]):.2f}x): no frequency stands out")
        chosen = order[: cut + 1]
    else:
        median = np.median(logs)
        spread = 1.4826 * np.median(np.abs(logs - median))
        chosen = np.flatnonzero(logs > median + n_mads * max(spread, 1e-12))
        if chosen.size == 0 or chosen.size > values.size // 2:
            raise ValueError(f"{chosen.size} of {values.size} frequencies exceed the median by "
                             f"{n_mads} MADs: no small set stands out")
    return sorted(int(i) + 1 for i in chosen)


@dataclass
class FrequencyReport:
    """Key frequencies of a trained transformer by two independent methods.

    ``embedding_power`` ``((p-1)//2,)``: :func:`embedding_fourier_power` of ``W_E``;
    ``neuron_votes`` ``((p-1)//2,)``: :func:`neuron_frequency_power` of the MLP neurons at
    "="; ``embedding`` and ``neurons``: :func:`key_frequencies` of each, or None where no
    frequency stands out (a run that has not formed its Fourier circuit yet).
    """

    embedding_power: np.ndarray
    neuron_votes: np.ndarray
    embedding: list[int] | None
    neurons: list[int] | None


def _standing_out(power: np.ndarray, rule: str) -> list[int] | None:
    try:
        return key_frequencies(power, rule=rule)
    except ValueError:
        return None


def _all_tokens(model: OneLayerTransformer) -> Tensor:
    """``(p*p, 3)`` long: every ``(a, b, "=")``, rows ``a * p + b``, on the model's device."""
    pairs, _ = modular_addition_data(model.p)
    return with_equals_token(pairs, model.p).to(model.W_E.weight.device)


def transformer_frequencies(model: OneLayerTransformer, *, rule: str = "gap") -> FrequencyReport:
    """:class:`FrequencyReport` of a one-layer transformer over all ``p*p`` inputs.

    The embedding power uses ``W_E``'s rows 0..p-1; the neuron votes the MLP activations
    ``(p*p, d_mlp)`` at the "=" position. ``rule`` as in :func:`key_frequencies`.
    """
    power = embedding_fourier_power(model.W_E.weight, model.p)
    with torch.no_grad():
        hidden = model.residual(_all_tokens(model))["mlp_hidden"][:, -1]   # (p*p, d_mlp)
    votes = neuron_frequency_power(hidden, model.p)
    return FrequencyReport(power, votes, _standing_out(power, rule), _standing_out(votes, rule))


def author_axis_sum(p: int, freqs: Sequence[int]) -> Tensor:
    """The paper's ``axis_sum`` family: the a-columns *plus* the b-columns, ``(p*p, 2n)``.

    Columns ``cos(2 pi k a/p) + cos(2 pi k b/p)`` and ``sin(2 pi k a/p) + sin(2 pi k b/p)`` per
    k (rows ``a * p + b``), as the author's notebook builds it, for n = ``len(freqs)``. Not the
    same as :func:`entk_helpers.fourier_family` ``(p, "axis_sum")``, which *concatenates* the
    a- and b-families: ``(p*p, 4n)``, a space that contains this one. Table 2 uses this one.
    """
    return fourier_family(p, "a", freqs) + fourier_family(p, "b", freqs)


def table2_overlaps(vectors: Tensor | np.ndarray, p: int, key: Sequence[int]
                    ) -> tuple[float, float]:
    """The paper's Table 2 for one kernel: (block A vs ``sum``, block B vs the author's axis_sum).

    Args:
        vectors: ``(p*p, k)`` eigenvectors, largest eigenvalue first, ``k >= 4n + 1`` for
            n = ``len(key)`` key frequencies.
        p: the modulus.
        key: the key frequencies.

    Returns:
        :func:`~entk_helpers.subspace_overlap` of modes ``0 .. 2n`` (2n + 1 vectors: a
        constant-like mode and the sum modes) with ``fourier_family(p, "sum", key)``, and of
        modes ``2n+1 .. 4n`` with :func:`author_axis_sum`; each at most 2n.
    """
    n = len(key)
    if vectors.ndim != 2 or vectors.shape[0] != p * p or vectors.shape[1] < 4 * n + 1:
        raise ValueError(f"vectors must be (p*p, >= 4n+1) = ({p * p}, >= {4 * n + 1}) for "
                         f"{n} key frequencies; got {tuple(vectors.shape)}")
    return (subspace_overlap(vectors[:, :2 * n + 1], fourier_family(p, "sum", key)),
            subspace_overlap(vectors[:, 2 * n + 1:4 * n + 1], author_axis_sum(p, key)))


def final_residual(model: OneLayerTransformer) -> Tensor:
    """``(p*p, d_model)`` float64 on the CPU: the final residual stream at "=" for every input."""
    with torch.no_grad():
        return model.residual(_all_tokens(model))["resid_final"][:, -1].double().cpu()


def unembedding_ntk(model: OneLayerTransformer) -> Tensor:
    """``(p*p, p*p)`` float64: the mean-logit eNTK of ``W_U`` alone, in closed form.

    The mean logit is ``(1/V) 1^T W_U h(x)`` (V the vocabulary size, h the final residual
    at "="), so ``K_WU(x, x') = h(x) . h(x') / V``.
    """
    h = final_residual(model)
    return h @ h.T / model.W_U.out_features


def unembedding_modes(model: OneLayerTransformer) -> Tensor:
    """``(p*p, d_model)``: the eigenvectors of :func:`unembedding_ntk`, largest first.

    The left singular vectors of the residuals :func:`final_residual` (one SVD of a
    ``(p*p, d_model)`` matrix instead of an eigendecomposition of ``(p*p, p*p)``).
    """
    return torch.linalg.svd(final_residual(model), full_matrices=False).U


def alignment_over_training(model: OneLayerTransformer, snapshots: Mapping[int, Mapping],
                            key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Fig. 3: how the top ``2n + 1`` ``W_U`` eNTK modes line up with ``sum`` over training.

    Args:
        model: a transformer of the snapshots' shape (it is copied, not changed).
        snapshots: ``{epoch: state_dict}`` (e.g. ``TrainingRun.snapshots``).
        key: the n key frequencies.

    Returns:
        ``epochs`` ``(S,)`` sorted and ``curve`` ``(S,)``: the overlap of the top 2n + 1
        :func:`unembedding_modes` with ``fourier_family(p, "sum", key)``, divided by its
        maximum 2n (a fraction in [0, 1]).
    """
    if not snapshots:
        raise ValueError("snapshots is empty: train with snapshot_every set to keep some")
    n, family, probe = len(key), fourier_family(model.p, "sum", key), copy.deepcopy(model)
    epochs = np.array(sorted(snapshots))
    curve = []
    for epoch in epochs:
        probe.load_state_dict(snapshots[epoch])
        curve.append(subspace_overlap(unembedding_modes(probe)[:, :2 * n + 1], family) / (2 * n))
    return epochs, np.array(curve)


def _check_curve(epochs: np.ndarray, curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    epochs, curve = np.asarray(epochs, dtype=np.float64), np.asarray(curve, dtype=np.float64)
    if epochs.ndim != 1 or epochs.shape != curve.shape or epochs.size < 2:
        raise ValueError(f"epochs {epochs.shape} and curve {curve.shape} must be 1-D of the same "
                         "length, at least 2")
    if np.any(np.diff(epochs) <= 0):
        raise ValueError("epochs must increase strictly (sort the snapshots first)")
    return epochs, curve


def smoothed_peak(epochs: np.ndarray, curve: np.ndarray, sd_epochs: float) -> int:
    """The epoch where the Gaussian-smoothed curve rises fastest.

    Args:
        epochs: ``(S,)`` evenly spaced, increasing.
        curve: ``(S,)`` values at those epochs.
        sd_epochs: the smoothing's standard deviation, in epochs.

    Returns:
        ``epochs[argmax(d smooth / d epoch)]`` (``np.gradient``: central differences).
    """
    epochs, curve = _check_curve(epochs, curve)
    steps = np.diff(epochs)
    if not np.allclose(steps, steps[0]):
        raise ValueError("epochs must be evenly spaced: the smoothing width is in snapshots")
    smooth = gaussian_filter1d(curve, sd_epochs / steps[0], mode="nearest")
    return int(epochs[np.argmax(np.gradient(smooth, epochs))])


def half_final_epoch(epochs: np.ndarray, curve: np.ndarray) -> float:
    """The first epoch at which ``curve`` reaches half its final value (linear interpolation).

    ``epochs`` and ``curve``: ``(S,)``; epochs increasing. Returns ``epochs[0]`` when the
    curve starts at or above that level.
    """
    epochs, curve = _check_curve(epochs, curve)
    level = curve[-1] / 2
    i = int(np.argmax(curve >= level))
    if i == 0:
        return float(epochs[0])
    return float(np.interp(level, curve[i - 1:i + 1], epochs[i - 1:i + 1]))


def frequencies_holding(power: Tensor | np.ndarray, share: float = 0.9) -> int:
    """How many frequencies, strongest first, hold at least ``share`` of the total power.

    ``power``: ``(F,)`` non-negative (e.g. :func:`embedding_fourier_power`). A network that
    uses a few frequencies needs few; one that spreads its power needs most of F.
    """
    values = as_tensor(power, torch.float64, "cpu").numpy()
    if values.ndim != 1 or values.size == 0 or np.any(values < 0) or values.sum() <= 0:
        raise ValueError("power must be a 1-D non-negative profile with a positive total")
    if not 0 < share <= 1:
        raise ValueError(f"share={share} must lie in (0, 1]")
    cumulative = np.cumsum(np.sort(values)[::-1]) / values.sum()
    return min(int(np.searchsorted(cumulative, share) + 1), values.size)


def family_power(outputs: Tensor | np.ndarray, p: int, kind: str = "sum") -> np.ndarray:
    """The outputs' power at each frequency of one Fourier family, summed over outputs.

    Args:
        outputs: ``(p*p, C)`` a function over the inputs (rows ``a * p + b``), e.g. logits.
        p: the modulus.
        kind: a :func:`~entk_helpers.fourier_family` kind of 2 columns per frequency
            (``"a"``, ``"b"``, ``"sum"``, ``"diff"``).

    Returns:
        ``((p-1)//2,)`` float64: entry k-1 is ``||B_k^T outputs||_F^2`` with ``B_k`` an
        orthonormal basis ``(p*p, 2)`` of the mean-centred cos and sin of frequency k.
    """
    if kind not in ("a", "b", "sum", "diff"):
        raise ValueError(f"kind={kind!r}; choose 'a', 'b', 'sum' or 'diff'")
    y = as_tensor(outputs, torch.float64, "cpu")
    if y.ndim != 2 or y.shape[0] != p * p:
        raise ValueError(f"outputs must be (p*p, C) = ({p * p}, C); got {tuple(y.shape)}")
    bases = torch.stack([orthonormal_basis(fourier_family(p, kind, [k]), center=True)
                         for k in range(1, (p - 1) // 2 + 1)])          # (F, p*p, 2)
    return ((bases.transpose(1, 2) @ y) ** 2).sum(dim=(1, 2)).numpy()


__all__ = [
    "FrequencyReport",
    "alignment_over_training",
    "author_axis_sum",
    "embedding_fourier_power",
    "family_power",
    "final_residual",
    "frequencies_holding",
    "half_final_epoch",
    "key_frequencies",
    "neuron_fourier_shares",
    "neuron_frequency_power",
    "smoothed_peak",
    "table2_overlaps",
    "transformer_frequencies",
    "unembedding_modes",
    "unembedding_ntk",
]
