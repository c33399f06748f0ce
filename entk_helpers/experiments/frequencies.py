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
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

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
    w = np.asarray(torch.as_tensor(W_E).detach().cpu().double())
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
    h = np.asarray(torch.as_tensor(hidden).detach().cpu().double())
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
    values = np.asarray(torch.as_tensor(power).detach().cpu().double())
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


__all__ = [
    "embedding_fourier_power",
    "key_frequencies",
    "neuron_fourier_shares",
    "neuron_frequency_power",
]
