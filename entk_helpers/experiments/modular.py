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
checkpoint to disk and resume. Each model's recipe has one source, :class:`MLPRecipe` and
:class:`TransformerRecipe` (defaults: the paper's; :func:`paper_mlp_recipe`,
:func:`paper_transformer_recipe` vary only the scale): :func:`train_recipe` trains it,
:func:`train_or_load` reuses a model saved with the very same recipe (every field and the
file format, :func:`recipe_key`) and trains otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._model import intra_op_threads
from ..files import save_torch
from ..kernels import empirical_ntk
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
# (and before they recorded a recipe)
_SETTINGS_BEFORE_BATCH_ORDER = {"batch_order": "randperm", "extra_draws_every": None,
                                "recipe": None}


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
    recipe: dict | None = None,
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
        recipe: plain data naming everything else that shaped the run (e.g.
            :func:`recipe_key`), recorded in checkpoints: one written for another is refused.
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
                "batch_order": batch_order, "extra_draws_every": extra_draws_every,
                "recipe": recipe}
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


@dataclass(frozen=True)
class MLPRecipe:
    """Every setting that shapes a trained :class:`ModularMLP` (defaults: the paper's, Sec. 1).

    The split and the initial weights come from one generator seeded with ``seed`` on the
    device ``draws_on`` (``randperm(p*p)`` first, then the weights: :func:`paper_mlp`;
    ``"cuda"`` gives the author's draws), the batches from a fresh CPU generator seeded with
    ``seed`` (``batch_order="randperm"``; full batch when ``batch_size`` is None).
    ``init`` and ``optimizer`` name those rules; only the paper's exist.
    """

    p: int = 29
    seed: int = 0
    epochs: int = 500
    width: int = 512
    train_fraction: float = 0.7
    draws_on: str = "cpu"
    init: str = "paper_mlp"
    optimizer: str = "AdamW"
    lr: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "mse"
    batch_size: int | None = None
    batch_order: str = "randperm"


@dataclass(frozen=True)
class TransformerRecipe:
    """Every setting that shapes a trained :class:`OneLayerTransformer` (defaults: the
    author's released notebook ``modular_arithmetic_transformer_v4``, the paper's Sec. 2).

    The initial weights and each epoch's DataLoader order come from one CPU generator seeded
    with ``seed`` (``init="paper"``: :class:`OneLayerTransformer`'s draws), plus the three
    seeds the author's logging drew every ``extra_draws_every`` epochs; the split is
    :func:`paper_transformer_split` with ``split_seed``. Cross-entropy on the first ``p``
    logits at the last position.
    """

    p: int = 29
    seed: int = 2
    epochs: int = 4000
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    n_ctx: int = 3
    train_fraction: float = 0.5
    split_seed: int = 0
    init: str = "paper"
    optimizer: str = "AdamW"
    lr: float = 3e-4
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "cross_entropy"
    batch_size: int = 64
    batch_order: str = "dataloader"
    extra_draws_every: int = 20


Recipe = MLPRecipe | TransformerRecipe

# The author's transformer recipe besides the seed, as a plain dict (kept for old callers)
PAPER_TRANSFORMER = {k: v for k, v in asdict(TransformerRecipe()).items() if k != "seed"}


def paper_mlp_recipe(seed: int = 0, epochs: int = 500, p: int = 29, *,
                     draws_on: torch.device | str = "cpu") -> MLPRecipe:
    """The paper's MLP recipe; only the scale (``seed``, ``epochs``, ``p``) and the device
    whose generator draws the split and weights may vary."""
    return MLPRecipe(p=p, seed=seed, epochs=epochs, draws_on=torch.device(draws_on).type)


def paper_transformer_recipe(seed: int = 2, epochs: int = 4000, p: int = 29) -> TransformerRecipe:
    """The author's transformer recipe; only the scale (``seed``, ``epochs``, ``p``) varies."""
    return TransformerRecipe(p=p, seed=seed, epochs=epochs)


def recipe_key(recipe: Recipe) -> dict:
    """What :func:`save_trained` records and :func:`load_trained` compares: the recipe's kind,
    every field, and the format version of saved models."""
    _check_kind(recipe)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(recipe).items()}
    return {"format": _TRAINED_FORMAT, "kind": type(recipe).__name__, **fields}


def recipe_digest(recipe: Recipe) -> str:
    """A 12-hex-digit name for :func:`recipe_key` (e.g. in a checkpoint's file name)."""
    text = json.dumps(recipe_key(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_split(recipe: Recipe) -> tuple[Tensor, Tensor]:
    """The recipe's (train indices, test indices) over the ``p * p`` pairs, on the CPU."""
    if isinstance(recipe, MLPRecipe):   # paper_mlp's first draw
        generator = torch.Generator(device=recipe.draws_on).manual_seed(recipe.seed)
        train_idx, test_idx = train_test_split(recipe.p ** 2, recipe.train_fraction,
                                               recipe.seed, generator=generator)
        return train_idx.cpu(), test_idx.cpu()
    _check_kind(recipe)
    return paper_transformer_split(recipe.p, recipe.train_fraction, recipe.split_seed)


def untrained_model(recipe: Recipe, device: torch.device | str = "cpu") -> nn.Module:
    """The recipe's model at its initial weights, on ``device``."""
    return _initial(recipe, device)[0]


def _initial(recipe: Recipe,
             device: torch.device | str) -> tuple[nn.Module, torch.Generator | None]:
    """The initial model and, for the transformer, the generator that drew it (it goes on
    to order the batches)."""
    _check_kind(recipe)
    init = "paper_mlp" if isinstance(recipe, MLPRecipe) else "paper"
    if recipe.init != init or recipe.optimizer != "AdamW":
        raise ValueError(f"init={recipe.init!r}, optimizer={recipe.optimizer!r}: only "
                         f"init={init!r} and optimizer='AdamW' are implemented")
    if isinstance(recipe, MLPRecipe):
        model, _, _ = paper_mlp(recipe.p, recipe.seed, width=recipe.width,
                                train_fraction=recipe.train_fraction, device=recipe.draws_on)
        return model.to(device), None
    generator = torch.Generator().manual_seed(recipe.seed)
    model = OneLayerTransformer(recipe.p, recipe.d_model, recipe.n_heads, recipe.d_mlp,
                                recipe.n_ctx, generator=generator)
    return model.to(device), generator


def _check_kind(recipe: object) -> None:
    if not isinstance(recipe, (MLPRecipe, TransformerRecipe)):
        raise TypeError(f"recipe is a {type(recipe).__name__}; pass an MLPRecipe or a "
                        "TransformerRecipe (paper_mlp_recipe / paper_transformer_recipe)")


def train_recipe(
    recipe: Recipe,
    *,
    snapshot_every: int | None = None,
    eval_every: int = 1,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, TrainingRun]:
    """Train the recipe's model from its initial weights (:func:`untrained_model`).

    ``snapshot_every`` (default: the paper's eNTK spacing, 10 epochs for the MLP, 20 for the
    transformer), ``eval_every``, ``checkpoint`` and ``checkpoint_every`` are :func:`train`'s
    and leave the trajectory unchanged; a checkpoint records the recipe and is resumed only
    for the same one.

    Returns:
        the trained model (eval mode, on ``device``) and its :class:`TrainingRun`.
    """
    model, generator = _initial(recipe, device)
    pairs, labels = modular_addition_data(recipe.p)
    train_idx, test_idx = recipe_split(recipe)
    common = dict(epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
                  betas=recipe.betas, loss=recipe.loss, batch_size=recipe.batch_size,
                  eval_every=eval_every, seed=recipe.seed, batch_order=recipe.batch_order,
                  checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                  recipe=recipe_key(recipe), progress=progress)
    if isinstance(recipe, MLPRecipe):
        run = train(model, pairs, labels, train_idx, test_idx,
                    snapshot_every=snapshot_every or 10, **common)
    else:
        run = train(model, with_equals_token(pairs, recipe.p), labels, train_idx, test_idx,
                    logits_at=-1, n_classes=recipe.p, snapshot_every=snapshot_every or 20,
                    generator=generator, extra_draws_every=recipe.extra_draws_every, **common)
    return model.eval(), run


def train_or_load(recipe: Recipe, path: str | Path, *, device: torch.device | str = "cpu",
                  save: bool = True, progress: bool = True) -> tuple[nn.Module, TrainingRun | None]:
    """The recipe's trained model: read from ``path`` when it was saved there with this very
    recipe (:func:`load_trained`), else trained (:func:`train_recipe`, one snapshot and one
    evaluation at the end) and, when ``save``, saved to ``path``.

    Returns:
        the model (eval mode, on ``device``) and the :class:`TrainingRun`, or None when read.
    """
    model = untrained_model(recipe, device)
    if load_trained(path, model, recipe):
        return model.eval(), None
    model, run = train_recipe(recipe, snapshot_every=recipe.epochs, eval_every=recipe.epochs,
                              device=device, progress=progress)
    if save:
        save_trained(path, model, recipe)
    return model, run


def test_accuracy(model: nn.Module, recipe: Recipe) -> float:
    """Accuracy of ``model`` on the recipe's held-out pairs (argmax over the first ``p``
    logits, at the last position for the transformer)."""
    pairs, labels = modular_addition_data(recipe.p)
    _, test_idx = recipe_split(recipe)
    inputs = pairs if isinstance(recipe, MLPRecipe) else with_equals_token(pairs, recipe.p)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(inputs.to(device))
    logits = (logits if isinstance(recipe, MLPRecipe) else logits[:, -1])[:, :recipe.p].cpu()
    return float((logits[test_idx].argmax(-1) == labels[test_idx]).float().mean())


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
    last position, AdamW lr 3e-4, weight decay 1.0, batch 64: :func:`paper_transformer_recipe`.
    On another device than the author's GPU the trajectory parts in floating point.

    Returns:
        the trained model (in eval mode, on ``device``) and its :class:`TrainingRun`
        (history over all ``p * p`` inputs every ``eval_every`` epochs, snapshots every
        ``snapshot_every``). Epoch e here is after e epochs of training; the author logged
        epoch e after e + 1.
    """
    return train_recipe(paper_transformer_recipe(seed, epochs, p),
                        snapshot_every=snapshot_every, eval_every=eval_every,
                        checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                        device=device, progress=progress)


# 2: the recipe as keyword settings; 3: a recipe object's every field (recipe_key). Files of
# an older format are never reused
_TRAINED_FORMAT = 3


def save_trained(path: str | Path, model: nn.Module, recipe: Recipe) -> Path:
    """Save a trained model's parameters with its recipe (:func:`recipe_key`), atomically.

    Notebooks save their final models under ``results/<name>/`` so later notebooks can reuse
    them through :func:`load_trained`, which reuses a file only for the very same recipe.
    """
    path = Path(path)
    save_torch({"state_dict": model.state_dict(), "info": recipe_key(recipe),
                "format": _TRAINED_FORMAT}, path)
    return path


def load_trained(path: str | Path, model: nn.Module, recipe: Recipe) -> bool:
    """Load parameters saved by :func:`save_trained` into ``model``; return whether it did.

    It does only if the file exists, was written in this format and its recorded recipe
    equals :func:`recipe_key` of ``recipe`` in every field, so a model trained another way
    (or by older code) is never reused. Only tensors and plain data are read
    (``weights_only``): a file that would run code when unpickled is refused with an error.
    """
    path = Path(path)
    key = recipe_key(recipe)
    if not path.exists():
        return False
    saved = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    if saved.get("format") != _TRAINED_FORMAT or saved.get("info") != key:
        return False
    model.load_state_dict(saved["state_dict"])
    return True


def trace_ntk_spectrum(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The trace eNTK over ``inputs`` and all its eigenpairs, float64 on the CPU.

    Returns:
        ``kernel`` (N, N), ``values`` (N,) descending, ``vectors`` (N, N) as columns.
    """
    kernel = empirical_ntk(model, inputs, output="trace").double().cpu()
    values, vectors = torch.linalg.eigh(kernel)
    return kernel, values.flip(0), vectors.flip(1)


def top_spectrum(kernel: Tensor, k: int, *, float32_up_to: int = 4096) -> tuple[Tensor, Tensor]:
    """The top ``k`` eigenpairs of a symmetric ``(N, N)`` kernel, descending, on the CPU.

    Up to ``float32_up_to`` inputs a float32 ``eigh`` of the whole kernel (the fastest route;
    the MLP's cliffs are separated by relative gaps far above float32 round-off); beyond it
    LAPACK's evr driver computes only the top ``k``, in float64.

    Returns:
        ``values`` (k,) float64 and ``vectors`` (N, k) (float32 or float64).
    """
    n = kernel.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != n or not 1 <= k <= n:
        raise ValueError(f"kernel must be square (N, N) and 1 <= k <= N; got shape "
                         f"{tuple(kernel.shape)} and k={k}")
    if n <= float32_up_to:
        values, vectors = torch.linalg.eigh(kernel.float())
        return values.flip(0)[:k].double().cpu(), vectors.flip(1)[:, :k].cpu()
    values, vectors = scipy.linalg.eigh(kernel.cpu().numpy(), subset_by_index=[n - k, n - 1],
                                        driver="evr")
    return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())


def spectra_over_training(run: TrainingRun, model: ModularMLP, pairs: Tensor, n_keep: int,
                          *, progress: bool = True) -> tuple[np.ndarray, Tensor, Tensor]:
    """The top ``n_keep`` eigenpairs of the MLP's trace eNTK (:func:`mlp_trace_ntk`, float32)
    at every snapshot of ``run``, loaded into a copy of ``model`` (same shapes).

    Returns:
        ``epochs`` (T,), ``values`` (T, n_keep) float64, ``vectors`` (T, N, n_keep) float32.
    """
    if not run.snapshots:
        raise ValueError("run has no snapshots: train with snapshot_every (e.g. 10)")
    epochs = sorted(run.snapshots)
    net = copy.deepcopy(model).eval()
    all_values, all_vectors = [], []
    for epoch in progress_bar(epochs, desc="eNTK per checkpoint", disable=not progress):
        net.load_state_dict(run.snapshots[epoch])
        values, vectors = top_spectrum(mlp_trace_ntk(net, pairs, dtype=torch.float32), n_keep)
        all_values.append(values)
        all_vectors.append(vectors.float())
    return np.array(epochs), torch.stack(all_values), torch.stack(all_vectors)


def transition_window(history: dict[str, np.ndarray], low: float = 0.2,
                      high: float = 0.9) -> tuple[int, int]:
    """The grokking transition of a :class:`TrainingRun` history: (the last epoch with test
    accuracy below ``low`` before it first exceeds ``high``, that first epoch)."""
    above = np.flatnonzero(history["test_acc"] > high)
    if not above.size:
        raise ValueError(f"test accuracy never exceeds {high}: the run has not grokked")
    below = np.flatnonzero(history["test_acc"][:above[0]] < low)
    if not below.size:
        raise ValueError(f"test accuracy is never below {low} before it exceeds {high}: "
                         "no transition to find (evaluate from epoch 0)")
    return int(history["epoch"][below[-1]]), int(history["epoch"][above[0]])
