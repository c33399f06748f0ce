"""Modular addition: the data, the paper's two models, and their training loops.

The task is ``(a, b) -> (a + b) mod p`` over all p*p pairs, inputs in row-major order
(row ``a * p + b``), the order :func:`entk_helpers.fourier_family` uses. Two models, as in
the paper (after Gromov 2023 and Nanda et al. 2023):

- :class:`ModularMLP`: one-hot(a) ++ one-hot(b) -> Linear(2p, width)/sqrt(2p) -> x^2 ->
  Linear(width, p)/width, weights N(0, 1), no biases.
- :class:`OneLayerTransformer`: tokens (a, b, "="), learned token and position embeddings,
  one causal attention layer and one ReLU MLP, no LayerNorm, no biases, initialised exactly
  as the author's notebook draws it; its tensors are ``nn.Linear`` / ``nn.Embedding``
  modules named as in the paper (W_E, W_pos, W_Q, W_K, W_V, W_O, W_in, W_out, W_U) so the
  structured eNTK applies to every one of them. :func:`train_paper_transformer` runs the
  author's recipe: the same initial weights, split (:func:`paper_transformer_split`) and
  batch order.

:func:`train` runs either (full batch or mini-batch AdamW), records accuracy and loss each
epoch, keeps parameter snapshots every few epochs for eNTKs over training, and can
checkpoint to disk and resume.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._model import intra_op_threads
from ..files import save_torch
from ..progress import progress_bar


def modular_addition_data(p: int) -> tuple[Tensor, Tensor]:
    """All p*p pairs. Returns ``pairs`` (p*p, 2) long, ``labels`` (p*p,) = (a + b) mod p."""
    if p < 3:
        raise ValueError(f"p={p}: use a modulus of at least 3 (the paper uses the prime 29)")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    return pairs, (pairs[:, 0] + pairs[:, 1]) % p


def train_test_split(n: int, train_fraction: float, seed: int, *,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A seeded random split of ``range(n)``: (train indices, test indices), each sorted.

    ``int(train_fraction * n)`` examples (rounded down, as in the author's notebooks: 588 of
    841 at 0.7) are the first entries of ``torch.randperm(n)``, drawn from ``generator`` when
    given (``seed`` is then unused; the indices come back on the generator's device), else
    from a fresh CPU generator seeded with ``seed``.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction={train_fraction} must be strictly between 0 and 1")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator, device=generator.device)
    n_train = int(train_fraction * n)
    if not 0 < n_train < n:
        raise ValueError(f"train_fraction={train_fraction} of n={n} leaves an empty split")
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def with_equals_token(pairs: Tensor, p: int) -> Tensor:
    """Transformer inputs ``(N, 3)``: a, b, and the "=" token (index p)."""
    return torch.cat([pairs, torch.full((pairs.shape[0], 1), p, dtype=pairs.dtype)], dim=1)


class ModularMLP(nn.Module):
    """The paper's MLP. ``forward(pairs (N, 2) long) -> logits (N, p)``.

    The weights are drawn as ``nn.Linear(2p, width)``, ``nn.Linear(width, p)`` (their default
    Kaiming-uniform draws, overwritten) and then ``N(0, 1)`` for each, in that order: the
    order of the author's ``ModularArithmeticMLP``. From torch's global generator by default,
    else from ``generator`` (on its device; ``device`` must then match it).
    """

    def __init__(self, p: int, width: int = 512, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.p = p
        if generator is not None:
            device = generator.device if device is None else torch.device(device)
            if device.type != generator.device.type:
                raise ValueError(f"device={device} but the generator is on "
                                 f"{generator.device}: draw the weights where the generator is")
        device = torch.device("cpu") if device is None else device
        self.layer1 = nn.utils.skip_init(nn.Linear, 2 * p, width, bias=False, device=device)
        self.layer2 = nn.utils.skip_init(nn.Linear, width, p, bias=False, device=device)
        with torch.no_grad():
            for layer in (self.layer1, self.layer2):   # what nn.Linear's constructor draws
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            for layer in (self.layer1, self.layer2):
                nn.init.normal_(layer.weight, mean=0.0, std=1.0, generator=generator)

    def forward(self, pairs: Tensor) -> Tensor:
        hidden = self.layer1(self._one_hot(pairs)) / math.sqrt(2 * self.p)
        return self.layer2(hidden**2) / self.layer2.in_features

    def preactivations(self, pairs: Tensor) -> Tensor:
        """The hidden layer before the square, ``z = W1 x / sqrt(2p)``: ``(N, width)``, linear
        in the one-hot input, so of rank at most 2p (for PCA baselines)."""
        return self.layer1(self._one_hot(pairs)) / math.sqrt(2 * self.p)

    def hidden(self, pairs: Tensor) -> Tensor:
        """The post-activation hidden layer ``h = z**2``: ``(N, width)`` (for PCA baselines)."""
        return self.preactivations(pairs) ** 2

    def _one_hot(self, pairs: Tensor) -> Tensor:
        """``(N, 2) -> (N, 2p)``, one-hot(a) ++ one-hot(b). A comparison rather than
        ``F.one_hot``, which checks values with ``.item()`` and so fails under ``vmap``."""
        classes = torch.arange(self.p, device=pairs.device)
        return torch.cat([pairs[:, :1] == classes, pairs[:, 1:2] == classes],
                         dim=1).to(self.layer1.weight.dtype)


def paper_mlp(p: int, seed: int, *, width: int = 512, train_fraction: float = 0.7,
              device: torch.device | str | None = None) -> tuple[ModularMLP, Tensor, Tensor]:
    """The MLP and split drawn as in the author's notebook: one generator seeded with
    ``seed``, first ``randperm(p*p)`` for the split, then the weights (:class:`ModularMLP`).

    The author ran ``torch.manual_seed(seed)``, ``torch.randperm(p*p, device="cuda")`` and the
    model on the GPU, so both came from the CUDA generator. The same calls on another device
    draw from that device's generator: on the CPU the order of draws is the author's but the
    numbers are not (the CPU generator is another algorithm).

    Returns:
        ``(model on device, train indices, test indices)``, the indices on the CPU.
    """
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    train_idx, test_idx = train_test_split(p * p, train_fraction, seed, generator=generator)
    model = ModularMLP(p, width, generator=generator)
    return model, train_idx.cpu(), test_idx.cpu()


def mlp_trace_ntk(model: ModularMLP, pairs: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """The trace eNTK of :class:`ModularMLP` in closed form: ``(N, N)`` in ``dtype``.

    With ``x`` the one-hot input (length 2p), ``z = W1 x / sqrt(2p)``, ``h = z**2`` and
    ``s_j = mean_c W2[c, j]**2``:
    ``K(x, x') = h.h' / width**2 + (x.x' / 2p) * 4 * sum_j s_j z_j z'_j / width**2``
    (layer 2, then layer 1). Two ``(N, width)`` products instead of per-input Jacobians;
    equal to ``empirical_ntk(model, pairs, output="trace")``.
    """
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (N, 2) (a, b) indices, got {tuple(pairs.shape)}")
    x = model._one_hot(pairs).to(dtype)
    w1, w2 = model.layer1.weight.detach().to(dtype), model.layer2.weight.detach().to(dtype)
    width, d_in = w1.shape
    z = x @ w1.T / math.sqrt(d_in)                         # (N, width)
    h = z**2
    s = (w2**2).mean(dim=0)                                # (width,)
    layer2 = h @ h.T / width**2
    layer1 = (x @ x.T / d_in) * ((z * s) @ z.T) * (4 / width**2)
    return layer1 + layer2


class OneLayerTransformer(nn.Module):
    """The paper's one-layer transformer (no LayerNorm, no biases, ReLU MLP, causal).

    ``forward(tokens (N, T) long) -> logits (N, T, vocab)``; ``p`` and "=" make vocab p + 1.

    Initialised as in the author's released notebook (``modular_arithmetic_transformer_v4``):
    nine draws ``torch.randn(shape) / sqrt(s)``, in this order, from ``generator`` (default:
    torch's global generator, so ``torch.manual_seed(seed)`` first gives the author's weights
    at that seed): W_E (vocab, d_model), s = d_model; W_pos (n_ctx, d_model), s = d_model;
    W_Q, W_K, W_V (n_heads, d_head, d_model), s = d_model; W_O (d_model, d_model),
    s = d_model; W_in (d_model, d_mlp), s = d_mlp; W_out (d_mlp, d_model), s = d_model;
    W_U (d_model, vocab), s = vocab. The module names are the paper's, and each is an
    ``nn.Embedding`` or bias-free ``nn.Linear`` so the structured eNTK applies to all nine;
    ``nn.Linear`` stores ``(out, in)``, so W_in, W_out and W_U hold the drawn tensor
    transposed, and W_Q, W_K, W_V the drawn tensor with (head, d_head) flattened into rows.
    """

    def __init__(self, p: int, d_model: int = 64, n_heads: int = 4, d_mlp: int = 256,
                 n_ctx: int = 3, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        vocab = p + 1
        self.p, self.n_heads, self.d_head = p, n_heads, d_model // n_heads
        # skip_init: the modules' own initialisers would draw from the global generator
        self.W_E = nn.utils.skip_init(nn.Embedding, vocab, d_model)
        self.W_pos = nn.utils.skip_init(nn.Embedding, n_ctx, d_model)
        for name, (d_in, d_out) in {"W_Q": (d_model, d_model), "W_K": (d_model, d_model),
                                    "W_V": (d_model, d_model), "W_O": (d_model, d_model),
                                    "W_in": (d_model, d_mlp), "W_out": (d_mlp, d_model),
                                    "W_U": (d_model, vocab)}.items():
            setattr(self, name, nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False))

        def draw(*shape: int, scale: int) -> Tensor:
            return torch.randn(*shape, generator=generator) / math.sqrt(scale)

        with torch.no_grad():
            self.W_E.weight.copy_(draw(vocab, d_model, scale=d_model))
            self.W_pos.weight.copy_(draw(n_ctx, d_model, scale=d_model))
            for lin in (self.W_Q, self.W_K, self.W_V):   # (heads, d_head, d_model) -> rows
                lin.weight.copy_(draw(n_heads, self.d_head, d_model, scale=d_model)
                                 .reshape(d_model, d_model))
            self.W_O.weight.copy_(draw(d_model, d_model, scale=d_model))
            self.W_in.weight.copy_(draw(d_model, d_mlp, scale=d_mlp).T)
            self.W_out.weight.copy_(draw(d_mlp, d_model, scale=d_model).T)
            self.W_U.weight.copy_(draw(d_model, vocab, scale=vocab).T)

    def residual(self, tokens: Tensor) -> dict[str, Tensor]:
        """Activations: ``embed``, ``attn_out``, ``mid`` (N, T, d_model), ``mlp_hidden``
        (N, T, d_mlp), ``resid_final`` (N, T, d_model)."""
        n, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(n, t)
        embed = self.W_E(tokens) + self.W_pos(positions)

        def heads(x: Tensor) -> Tensor:
            return x.view(n, t, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(self.W_Q(embed)), heads(self.W_K(embed)), heads(self.W_V(embed))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        pattern = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        attn_out = self.W_O((pattern @ v).transpose(1, 2).reshape(n, t, -1))
        mid = embed + attn_out
        mlp_hidden = F.relu(self.W_in(mid))
        return {"embed": embed, "attn_out": attn_out, "mid": mid, "mlp_hidden": mlp_hidden,
                "resid_final": mid + self.W_out(mlp_hidden)}

    def forward(self, tokens: Tensor) -> Tensor:
        return self.W_U(self.residual(tokens)["resid_final"])


def paper_transformer_split(p: int, train_fraction: float = 0.5,
                            seed: int = 0) -> tuple[Tensor, Tensor]:
    """The author's transformer split: (train rows, test rows), in the author's order.

    As in the released notebook: the list of pairs in row-major order, shuffled by Python's
    ``random.shuffle`` after ``random.seed(seed)`` (seed 0 there); the first
    ``int(train_fraction * p * p)`` are train. Rows are ``a * p + b``, in the shuffled
    order (the order the author's DataLoader indexes). Python's global generator is left as
    it was.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction={train_fraction} must be strictly between 0 and 1")
    rows = list(range(p * p))
    random.Random(seed).shuffle(rows)
    n_train = int(train_fraction * len(rows))
    return torch.tensor(rows[:n_train]), torch.tensor(rows[n_train:])


def _dataloader_order(generator: torch.Generator, n: int) -> Tensor:
    """The sample order one pass of ``DataLoader(..., shuffle=True)`` (no generator given)
    takes, drawing from ``generator`` where the DataLoader draws from torch's global one:
    an int64 base seed for the iterator, an int64 seed for the sampler's own generator,
    then that generator's ``randperm(n)``."""
    _draw_seed(generator)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_draw_seed(generator)))


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


@dataclass
class TrainingRun:
    """What :func:`train` produced.

    ``history``: arrays ``epoch``, ``train_acc``, ``test_acc``, ``train_loss``, ``test_loss``,
    one entry per evaluated epoch (every epoch unless ``train(eval_every=...)`` said
    otherwise). ``snapshots``: ``{epoch: state_dict}`` every ``snapshot_every`` epochs
    (epoch 0 = initialisation). ``seconds``: wall time spent training, summed over the
    calls that resumed one checkpoint (a run read back from a finished checkpoint keeps the
    time it took when it ran).
    """

    history: dict[str, np.ndarray]
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    def first_epoch(self, metric: str, threshold: float) -> int | None:
        """First epoch at which ``history[metric] >= threshold`` (None if never)."""
        hits = np.flatnonzero(self.history[metric] >= threshold)
        return int(self.history["epoch"][hits[0]]) if hits.size else None

    def value_at(self, metric: str, epoch: int) -> float:
        """``history[metric]`` at ``epoch``; a KeyError if that epoch was not evaluated."""
        hits = np.flatnonzero(self.history["epoch"] == epoch)
        if not hits.size:
            evaluated = self.history["epoch"]
            raise KeyError(f"epoch {epoch} was not evaluated (evaluated: {evaluated[:3].tolist()}"
                           f" ... {evaluated[-1]}); train with an eval_every that divides it")
        return float(self.history[metric][hits[0]])


# checkpoints written before train() had batch_order / extra_draws_every ordered as these say
_SETTINGS_BEFORE_BATCH_ORDER = {"batch_order": "randperm", "extra_draws_every": None}


def _loss(logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    if kind == "mse":
        return F.mse_loss(logits, F.one_hot(labels, logits.shape[-1]).to(logits.dtype))
    return F.cross_entropy(logits, labels)


def train(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    train_idx: Tensor,
    test_idx: Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    loss: str = "mse",
    batch_size: int | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    logits_at: int | None = None,
    n_classes: int | None = None,
    snapshot_every: int = 10,
    eval_every: int = 1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    batch_order: str = "randperm",
    extra_draws_every: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    cpu_threads: int | None = 1,
    progress: bool = True,
) -> TrainingRun:
    """Train with AdamW; full batch when ``batch_size`` is None, else shuffled mini-batches.

    Args:
        inputs: ``(N, ...)`` all examples; ``labels`` ``(N,)``; the index tensors pick splits.
        loss: ``"mse"`` against one-hot targets or ``"cross_entropy"``.
        logits_at: for sequence outputs ``(N, T, V)``, the position read (e.g. -1).
        n_classes: keep only the first ``n_classes`` logits for loss and accuracy.
        snapshot_every: keep a copy of the parameters every this many epochs (and at 0).
        eval_every: evaluate accuracy and loss on all inputs every this many epochs (and at 0
            and the last epoch). Evaluation does not touch the training trajectory; a
            larger value only makes long mini-batch runs cheaper and the curves coarser.
        seed: seeds the generator that orders the batches (recorded in checkpoints).
        generator: order the batches with this generator instead of a fresh one seeded with
            ``seed`` (e.g. the one that drew the model's initial weights, continuing).
        batch_order: ``"randperm"``, each epoch ``train_idx[randperm]`` from the generator;
            or ``"dataloader"``, the order ``torch.utils.data.DataLoader(shuffle=True)`` over
            ``train_idx`` takes when it draws from torch's global generator (the author's
            transformer run), with ``generator`` standing in for that global one.
        extra_draws_every: with ``batch_order="dataloader"``: after epochs 1, 1 + k,
            1 + 2k, ... also draw the three seeds that the author's logging drew there (one
            pass over a test DataLoader, one more over the train DataLoader; k = 20 there).
        checkpoint: a file to save the run to (atomically) every ``checkpoint_every`` epochs
            (default ``snapshot_every``) and at the end, and to resume from if it exists: an
            interrupted run continues, a finished one is read back without training. It
            refuses (ValueError) a file written with other settings or another split.
        cpu_threads: torch's intra-op threads during training on the CPU (restored after;
            None keeps the current setting). The toy models' ops are too small to gain from
            more threads, and one thread keeps its speed when another process competes for
            the cores, where two run about three times slower (``benchmarks/bench_training.py``).

    Returns:
        :class:`TrainingRun`.
    """
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"loss={loss!r}; use 'mse' or 'cross_entropy'")
    checkpoint_every = snapshot_every if checkpoint_every is None else checkpoint_every
    if min(snapshot_every, eval_every, checkpoint_every) < 1:
        raise ValueError(f"snapshot_every={snapshot_every}, eval_every={eval_every}, "
                         f"checkpoint_every={checkpoint_every}: all must be positive numbers "
                         "of epochs")
    if batch_order not in ("randperm", "dataloader"):
        raise ValueError(f"batch_order={batch_order!r}; use 'randperm' or 'dataloader'")
    if extra_draws_every is not None and (batch_order != "dataloader" or extra_draws_every < 1):
        raise ValueError(f"extra_draws_every={extra_draws_every}: use a positive number of "
                         "epochs, with batch_order='dataloader' (or None)")
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError(f"cpu_threads={cpu_threads}: use a positive number, or None to keep "
                         "torch's current setting")
    device = next(model.parameters()).device
    inputs, labels = inputs.to(device), labels.to(device)
    # fused: one kernel per step instead of a dozen small ops per tensor (CPU and CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  betas=betas, fused=device.type in ("cpu", "cuda"))
    generator = torch.Generator().manual_seed(seed) if generator is None else generator
    keys = ("epoch", "train_acc", "test_acc", "train_loss", "test_loss")
    history: dict[str, list[float]] = {k: [] for k in keys}
    snapshots: dict[int, dict[str, Tensor]] = {}
    start, seconds_before = 0, 0.0
    path = Path(checkpoint) if checkpoint else None
    # what a resumed run must share with the one that wrote the checkpoint (not `epochs`:
    # resuming with more epochs extends a run)
    settings = {"lr": lr, "weight_decay": weight_decay, "loss": loss, "batch_size": batch_size,
                "betas": tuple(betas), "logits_at": logits_at, "n_classes": n_classes,
                "snapshot_every": snapshot_every, "eval_every": eval_every, "seed": seed,
                "train_idx": train_idx.tolist(), "n_inputs": len(inputs),
                "batch_order": batch_order, "extra_draws_every": extra_draws_every}
    if path and path.exists():
        # on the CPU: the generator's state must stay a CPU ByteTensor; load_state_dict moves
        # the model's and the optimizer's tensors to the model's device. weights_only: a
        # checkpoint is data (tensors, numbers, lists), never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = {**_SETTINGS_BEFORE_BATCH_ORDER, **state.get("settings", {})}
        differ = sorted(k for k, v in settings.items() if saved.get(k) != v)
        if differ:
            raise ValueError(f"checkpoint {path} was written by a run with other {differ}; "
                             "delete it, or pass another checkpoint path for these settings")
        if state["epoch"] > epochs:
            raise ValueError(f"checkpoint {path} is at epoch {state['epoch']}, past "
                             f"epochs={epochs}; ask for at least {state['epoch']} epochs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, snapshots, start = state["history"], state["snapshots"], state["epoch"]
        seconds_before = state.get("seconds", 0.0)

    def logits_of(x: Tensor) -> Tensor:
        out = model(x)
        out = out[:, logits_at] if logits_at is not None else out
        return out[:, :n_classes] if n_classes is not None else out

    def evaluate(epoch: int) -> None:
        model.eval()
        with torch.no_grad():
            logits = logits_of(inputs)
        model.train()
        history["epoch"].append(epoch)
        for split, idx in (("train", train_idx), ("test", test_idx)):
            history[f"{split}_acc"].append(
                float((logits[idx].argmax(-1) == labels[idx]).float().mean()))
            history[f"{split}_loss"].append(float(_loss(logits[idx], labels[idx], loss)))

    def snapshot(epoch: int) -> None:
        snapshots[epoch] = copy.deepcopy({k: v.detach().cpu()
                                          for k, v in model.state_dict().items()})

    began = time.perf_counter()
    with intra_op_threads(cpu_threads if device.type == "cpu" else None):
        if start == 0:
            evaluate(0)
            snapshot(0)
        model.train()
        bar = progress_bar(range(start + 1, epochs + 1), desc="training", disable=not progress,
                           initial=start, total=epochs)
        for epoch in bar:
            if batch_order == "dataloader":
                order = train_idx[_dataloader_order(generator, len(train_idx))]
            else:
                order = train_idx[torch.randperm(len(train_idx), generator=generator)]
            for batch in order.split(batch_size or len(order)):
                optimizer.zero_grad(set_to_none=True)
                _loss(logits_of(inputs[batch]), labels[batch], loss).backward()
                optimizer.step()
            if extra_draws_every and (epoch - 1) % extra_draws_every == 0:
                for _ in range(3):
                    _draw_seed(generator)
            if epoch % eval_every == 0 or epoch == epochs:
                evaluate(epoch)
            if epoch % snapshot_every == 0:
                snapshot(epoch)
            if epoch % max(1, epochs // 50) == 0:
                bar.set_postfix(train=f"{history['train_acc'][-1]:.2f}",
                                test=f"{history['test_acc'][-1]:.2f}", refresh=False)
            if path and (epoch % checkpoint_every == 0 or epoch == epochs):
                save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "generator": generator.get_state(), "history": history,
                            "snapshots": snapshots, "epoch": epoch, "settings": settings,
                            "seconds": seconds_before + time.perf_counter() - began}, path)
    model.eval()
    return TrainingRun({k: np.asarray(v) for k, v in history.items()}, snapshots,
                       seconds_before + (time.perf_counter() - began if start < epochs else 0.0))


# The author's transformer recipe (released notebook modular_arithmetic_transformer_v4): the
# settings besides the seed that shape the trained weights
PAPER_TRANSFORMER = {"p": 29, "d_model": 64, "n_heads": 4, "d_mlp": 256,
                     "train_fraction": 0.5, "split_seed": 0, "lr": 3e-4, "weight_decay": 1.0,
                     "betas": (0.9, 0.999), "batch_size": 64, "loss": "cross_entropy",
                     "batch_order": "dataloader", "extra_draws_every": 20, "epochs": 4000}


def paper_transformer_recipe(seed: int = 2, epochs: int = 4000, p: int = 29) -> dict:
    """Everything that shapes :func:`train_paper_transformer`'s weights: the recipe to give
    :func:`save_trained` and :func:`load_trained`."""
    return {**PAPER_TRANSFORMER, "p": p, "epochs": epochs, "seed": seed}


def train_paper_transformer(
    seed: int = 2,
    *,
    p: int = 29,
    epochs: int = 4000,
    snapshot_every: int = 20,
    eval_every: int = 10,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[OneLayerTransformer, TrainingRun]:
    """The author's transformer run at ``seed`` (the paper's is 2): init, split, batches.

    One generator seeded with ``seed`` plays the author's global generator after
    ``torch.manual_seed(seed)``: it draws the initial weights (:class:`OneLayerTransformer`),
    then each epoch's DataLoader order, plus the three seeds the author's logging drew after
    epochs 1, 21, 41, ... . The split is :func:`paper_transformer_split` (Python ``random``,
    seed 0, whatever ``seed`` is), the loss cross-entropy on the first ``p`` logits at the
    last position, AdamW lr 3e-4, weight decay 1.0, batch 64, as in :data:`PAPER_TRANSFORMER`.
    On another device than the author's GPU the trajectory parts in floating point.

    Returns:
        the trained model (in eval mode, on ``device``) and its :class:`TrainingRun`
        (history over all ``p * p`` inputs every ``eval_every`` epochs, snapshots every
        ``snapshot_every``). Epoch e here is after e epochs of training; the author logged
        epoch e after e + 1.
    """
    recipe = PAPER_TRANSFORMER
    generator = torch.Generator().manual_seed(seed)
    model = OneLayerTransformer(p, recipe["d_model"], recipe["n_heads"], recipe["d_mlp"],
                                generator=generator).to(device)
    train_idx, test_idx = paper_transformer_split(p, recipe["train_fraction"],
                                                  recipe["split_seed"])
    pairs, labels = modular_addition_data(p)
    run = train(model, with_equals_token(pairs, p), labels, train_idx, test_idx,
                epochs=epochs, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                betas=recipe["betas"], loss=recipe["loss"], batch_size=recipe["batch_size"],
                logits_at=-1, n_classes=p, snapshot_every=snapshot_every,
                eval_every=eval_every, seed=seed, generator=generator,
                batch_order=recipe["batch_order"],
                extra_draws_every=recipe["extra_draws_every"], checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, progress=progress)
    return model, run


# files written by save_trained before the transformer's initialisation was the paper's carry
# no format number; load_trained never reuses them
_TRAINED_FORMAT = 2


def save_trained(path: str | Path, model: nn.Module, **recipe: object) -> Path:
    """Save a trained model's parameters with its recipe, atomically.

    ``recipe``: every setting that shaped the weights (``p``, ``seed``, ``epochs``, learning
    rate, split, ...; plain numbers, strings, lists, tuples, dicts). Notebooks save their
    final models under ``results/<name>/`` so later notebooks can reuse them through
    :func:`load_trained`, which reuses a file only for the very same recipe.
    """
    path = Path(path)
    save_torch({"state_dict": model.state_dict(), "info": recipe, "format": _TRAINED_FORMAT},
               path)
    return path


def load_trained(path: str | Path, model: nn.Module, **recipe: object) -> bool:
    """Load parameters saved by :func:`save_trained` into ``model``; return whether it did.

    It does only if the file exists, was written by this version of :func:`save_trained`
    and its recorded recipe equals the one asked for exactly, so a model trained another way
    (or by older code) is never reused. For a :class:`OneLayerTransformer` the settings not
    given are the paper's (:data:`PAPER_TRANSFORMER`): ``load_trained(path, model, p=29,
    seed=2, epochs=4000)`` asks for the author's run at seed 2 and nothing else. For other
    models the recipe asked for is ``recipe`` itself. Only tensors and plain data are read
    (``weights_only``): a file that would run code when unpickled is refused with an error.
    """
    path = Path(path)
    if not path.exists():
        return False
    saved = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    if isinstance(model, OneLayerTransformer):
        recipe = {**PAPER_TRANSFORMER, **recipe}
    if saved.get("format") != _TRAINED_FORMAT or saved.get("info") != recipe:
        return False
    model.load_state_dict(saved["state_dict"])
    return True
