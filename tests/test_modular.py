"""Modular-addition data, the paper's two models, and a few-epoch smoke test of ``train``."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ntk_references import brute_force_ntk, reduce_kernel, rel_err
from torch.utils.data import DataLoader, TensorDataset

from entk_helpers import empirical_ntk
from entk_helpers.experiments.modular import (
    MLPRecipe,
    ModularMLP,
    OneLayerTransformer,
    TransformerRecipe,
    load_trained,
    mlp_trace_ntk,
    modular_addition_data,
    paper_mlp,
    paper_mlp_recipe,
    paper_transformer_recipe,
    paper_transformer_split,
    save_trained,
    spectra_over_training,
    top_spectrum,
    trace_ntk_spectrum,
    train,
    train_or_load,
    train_paper_transformer,
    train_recipe,
    train_test_split,
    transition_window,
    untrained_model,
    with_equals_token,
)

P = 7


def test_data_in_row_major_order() -> None:
    pairs, labels = modular_addition_data(P)
    assert pairs.shape == (P * P, 2) and labels.shape == (P * P,)
    assert pairs.dtype == torch.long
    a, b = 3, 5
    assert pairs[a * P + b].tolist() == [a, b]
    assert torch.equal(labels, (pairs[:, 0] + pairs[:, 1]) % P)
    with pytest.raises(ValueError, match="at least 3"):
        modular_addition_data(2)


def test_split_is_seeded_disjoint_and_complete() -> None:
    train_idx, test_idx = train_test_split(P * P, 0.4, seed=3)
    again, _ = train_test_split(P * P, 0.4, seed=3)
    other, _ = train_test_split(P * P, 0.4, seed=4)
    assert torch.equal(train_idx, again) and not torch.equal(train_idx, other)
    assert len(train_idx) == int(0.4 * P * P)
    assert sorted(torch.cat([train_idx, test_idx]).tolist()) == list(range(P * P))
    assert torch.equal(train_idx, train_idx.sort().values)
    with pytest.raises(ValueError, match="strictly between"):
        train_test_split(10, 1.0, seed=0)


def test_mlp_shapes_and_formula() -> None:
    model = ModularMLP(P, width=16)
    pairs, _ = modular_addition_data(P)
    logits = model(pairs)
    assert logits.shape == (P * P, P)
    assert not any(m.bias is not None for m in (model.layer1, model.layer2))
    one_hot = torch.zeros(P * P, 2 * P)
    one_hot[torch.arange(P * P), pairs[:, 0]] = 1
    one_hot[torch.arange(P * P), P + pairs[:, 1]] = 1
    hidden = (one_hot @ model.layer1.weight.T / np.sqrt(2 * P)) ** 2
    assert torch.allclose(model.hidden(pairs), hidden, atol=1e-5)
    assert torch.allclose(logits, hidden @ model.layer2.weight.T / 16, atol=1e-5)


def test_transformer_shapes_names_and_causality() -> None:
    model = OneLayerTransformer(P, d_model=8, n_heads=2, d_mlp=16).eval()
    pairs, _ = modular_addition_data(P)
    tokens = with_equals_token(pairs, P)
    assert tokens.shape == (P * P, 3) and (tokens[:, 2] == P).all()
    logits = model(tokens)
    assert logits.shape == (P * P, 3, P + 1)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U"}
    acts = model.residual(tokens[:4])
    assert set(acts) == {"embed", "attn_out", "mid", "mlp_hidden", "resid_final"}
    assert acts["mlp_hidden"].shape == (4, 3, 16)
    changed = tokens[:4].clone()
    changed[:, 1] = (changed[:, 1] + 1) % P  # position 0 must not see position 1
    assert torch.allclose(model(changed)[:, 0], logits[:4, 0], atol=1e-6)
    assert not torch.allclose(model(changed)[:, 2], logits[:4, 2], atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        OneLayerTransformer(P, d_model=10, n_heads=4)


def test_structured_ntk_applies_to_every_transformer_tensor() -> None:
    model = OneLayerTransformer(P, d_model=8, n_heads=2, d_mlp=16).double().eval()
    tokens = with_equals_token(modular_addition_data(P)[0][:6], P)
    last = lambda out: out[:, -1, :P]  # noqa: E731
    structured = empirical_ntk(model, tokens, select=last, method="structured")
    jacobian = empirical_ntk(model, tokens, select=last, method="jacobian")
    assert torch.allclose(structured, jacobian, rtol=1e-10, atol=1e-12)


def test_every_ntk_method_works_on_the_mlp() -> None:
    """The Jacobian route vmaps over single examples: the one-hot must be vmap-safe."""
    model = ModularMLP(P, width=16).double()
    pairs, _ = modular_addition_data(P)
    structured = empirical_ntk(model, pairs[:10], output="full", method="structured")
    jacobian = empirical_ntk(model, pairs[:10], output="full", method="jacobian")
    assert torch.allclose(structured, jacobian, rtol=1e-10, atol=1e-12)


def test_closed_form_mlp_kernel_matches_brute_force(float64) -> None:
    model = ModularMLP(P, width=16)
    pairs, _ = modular_addition_data(P)
    expected = reduce_kernel(brute_force_ntk(model, pairs[::3]), "trace")
    assert rel_err(mlp_trace_ntk(model, pairs[::3]), expected) < 1e-12
    assert rel_err(mlp_trace_ntk(model, pairs[::3], dtype=torch.float32), expected) < 1e-5
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        mlp_trace_ntk(model, pairs[:, :1])


def train_mlp(epochs: int, checkpoint: Path | None = None, eval_every: int = 1,
              device: str = "cpu") -> tuple[ModularMLP, object]:
    torch.manual_seed(0)
    model = ModularMLP(P, width=32).to(device)
    pairs, labels = modular_addition_data(P)
    train_idx, test_idx = train_test_split(P * P, 0.5, seed=0)
    run = train(model, pairs, labels, train_idx, test_idx, epochs=epochs, lr=1e-2,
                weight_decay=1e-3, snapshot_every=2, eval_every=eval_every, batch_size=8,
                checkpoint=checkpoint, progress=False)
    return model, run


def test_train_smoke() -> None:
    """A known-learnable task first: full-batch AdamW memorises 25 pairs with 32 hidden units
    within 60 epochs (it takes 21 here), which a broken loss, optimizer step or accuracy
    would not; then the bookkeeping of a short mini-batch run."""
    torch.manual_seed(0)
    model = ModularMLP(P, width=32)
    pairs, labels = modular_addition_data(P)
    train_idx, test_idx = train_test_split(P * P, 0.5, seed=0)
    run = train(model, pairs, labels, train_idx, test_idx, epochs=60, lr=0.05,
                weight_decay=0.0, snapshot_every=60, progress=False)
    assert run.history["train_acc"][0] < 0.5
    assert run.history["train_acc"][-1] == 1.0
    assert run.history["train_loss"][-1] < 1e-2 * run.history["train_loss"][0]
    with torch.no_grad():   # the recorded accuracy is the model's own
        predicted = model(pairs[train_idx]).argmax(-1)
    assert torch.equal(predicted, labels[train_idx])
    model, run = train_mlp(6)
    history = run.history
    assert set(history) == {"epoch", "train_acc", "test_acc", "train_loss", "test_loss"}
    assert history["epoch"].tolist() == list(range(7))
    assert sorted(run.snapshots) == [0, 2, 4, 6]
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert np.all((history["train_acc"] >= 0) & (history["train_acc"] <= 1))
    final = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(final[k], v) for k, v in run.snapshots[6].items())
    assert not torch.equal(run.snapshots[0]["layer1.weight"], final["layer1.weight"])
    assert run.first_epoch("train_acc", 2.0) is None
    assert run.first_epoch("train_acc", 0.0) == 0
    assert not model.training


def test_eval_every_thins_the_history_but_not_the_training() -> None:
    every, run_every = train_mlp(7)
    sparse, run_sparse = train_mlp(7, eval_every=3)
    assert run_sparse.history["epoch"].tolist() == [0, 3, 6, 7]   # and always the last one
    assert sorted(run_sparse.snapshots) == [0, 2, 4, 6]
    for key, value in every.state_dict().items():
        assert torch.equal(sparse.state_dict()[key], value), key
    for epoch in (0, 3, 6, 7):
        assert run_sparse.value_at("test_acc", epoch) == run_every.value_at("test_acc", epoch)
    with pytest.raises(KeyError, match="epoch 4 was not evaluated"):
        run_sparse.value_at("test_acc", 4)
    with pytest.raises(ValueError, match="positive"):
        train_mlp(2, eval_every=0)


def test_train_transformer_with_logits_at_and_n_classes() -> None:
    model = OneLayerTransformer(P, d_model=8, n_heads=2, d_mlp=16)
    pairs, labels = modular_addition_data(P)
    tokens = with_equals_token(pairs, P)
    train_idx, test_idx = train_test_split(P * P, 0.5, seed=0)
    run = train(model, tokens, labels, train_idx, test_idx, epochs=3, lr=1e-2,
                weight_decay=1.0, loss="cross_entropy", logits_at=-1, n_classes=P,
                progress=False)
    assert run.history["train_loss"][-1] < run.history["train_loss"][0]
    with pytest.raises(ValueError, match="'mse' or 'cross_entropy'"):
        train(model, tokens, labels, train_idx, test_idx, epochs=1, lr=1e-3,
              weight_decay=0.0, loss="hinge")


class _ThreadRecordingMLP(ModularMLP):
    """Records torch's intra-op thread count at every forward."""

    def __init__(self) -> None:
        super().__init__(P, width=8)
        self.threads_seen: set[int] = set()

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        self.threads_seen.add(torch.get_num_threads())
        return super().forward(pairs)


@pytest.mark.parametrize("cpu_threads", [1, None])
def test_train_uses_the_asked_threads_and_restores_the_callers(cpu_threads: int | None) -> None:
    pairs, labels = modular_addition_data(P)
    train_idx, test_idx = train_test_split(P * P, 0.5, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _ThreadRecordingMLP()
        train(model, pairs, labels, train_idx, test_idx, epochs=2, lr=1e-2, weight_decay=0.0,
              cpu_threads=cpu_threads, progress=False)
        assert model.threads_seen == {cpu_threads or 2}
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="cpu_threads=0"):
            train(model, pairs, labels, train_idx, test_idx, epochs=1, lr=1e-2,
                  weight_decay=0.0, cpu_threads=0, progress=False)
    finally:
        torch.set_num_threads(before)


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    train_mlp(4, checkpoint=path)
    resumed, resumed_run = train_mlp(6, checkpoint=path)  # continues from epoch 4
    straight, straight_run = train_mlp(6)
    for key, value in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key
    np.testing.assert_allclose(resumed_run.history["train_loss"],
                               straight_run.history["train_loss"], rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_resume_on_cuda(tmp_path: Path) -> None:
    # a checkpoint written on a GPU once failed to resume there: the CPU generator's state
    # was loaded onto the GPU ("RNG state must be a torch.ByteTensor")
    path = tmp_path / "run.pt"
    train_mlp(4, checkpoint=path, device="cuda")
    resumed, resumed_run = train_mlp(6, checkpoint=path, device="cuda")
    straight, straight_run = train_mlp(6, device="cuda")
    assert next(resumed.parameters()).is_cuda
    np.testing.assert_allclose(resumed_run.history["train_loss"],
                               straight_run.history["train_loss"], rtol=1e-5)


def test_a_finished_checkpoint_is_read_back_and_other_settings_are_refused(
        tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    trained, run = train_mlp(5, checkpoint=path)
    assert torch.load(path, weights_only=True)["epoch"] == 5   # saved at the end too
    again, run_again = train_mlp(5, checkpoint=path)             # no training: read back
    for key, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    np.testing.assert_array_equal(run_again.history["test_acc"], run.history["test_acc"])
    assert sorted(run_again.snapshots) == sorted(run.snapshots)
    saved_seconds = torch.load(path, weights_only=True)["seconds"]
    assert run_again.seconds == saved_seconds <= run.seconds   # the original run's time
    with pytest.raises(ValueError, match=r"other \['eval_every'\]"):
        train_mlp(5, checkpoint=path, eval_every=2)
    with pytest.raises(ValueError, match="past epochs=3"):
        train_mlp(3, checkpoint=path)


def test_save_and_load_trained_check_the_recipe(tmp_path: Path) -> None:
    recipe = MLPRecipe(p=P, width=8, seed=0)
    model = ModularMLP(P, width=8)
    path = save_trained(tmp_path / "mlp.pt", model, recipe)
    fresh = ModularMLP(P, width=8)
    assert not load_trained(tmp_path / "missing.pt", fresh, recipe)
    assert not load_trained(path, fresh, MLPRecipe(p=P, width=8, seed=1))
    assert not torch.equal(fresh.layer1.weight, model.layer1.weight)
    assert load_trained(path, fresh, recipe)
    assert torch.equal(fresh.layer1.weight, model.layer1.weight)
    with pytest.raises(TypeError, match="MLPRecipe"):
        load_trained(path, fresh, {"p": P})


# --- the author's transformer recipe, written here from the facts of the released notebook
# (modular_arithmetic_transformer_v4), independently of entk_helpers.experiments.modular


def _paper_draws(seed: int) -> dict[str, torch.Tensor]:
    """The author's nine initial tensors, in the author's shapes and order of draws."""
    torch.manual_seed(seed)
    shapes = [("W_E", (30, 64), 64), ("W_pos", (3, 64), 64), ("W_Q", (4, 16, 64), 64),
              ("W_K", (4, 16, 64), 64), ("W_V", (4, 16, 64), 64), ("W_O", (64, 64), 64),
              ("W_in", (64, 256), 256), ("W_out", (256, 64), 64), ("W_U", (64, 30), 30)]
    return {name: torch.randn(shape) / np.sqrt(s) for name, shape, s in shapes}


def _as_modules(draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The drawn tensors as our modules store them (nn.Linear: (out, in))."""
    stored = dict(draws)
    for name in ("W_Q", "W_K", "W_V"):   # q[n, h] = sum_m W_Q[n, h, m] x[m]
        stored[name] = draws[name].reshape(64, 64)
    for name in ("W_in", "W_out", "W_U"):   # x @ W
        stored[name] = draws[name].T
    return {f"{name}.weight": value for name, value in stored.items()}


@pytest.mark.parametrize("seed", [2, 5])
def test_transformer_init_is_the_papers_draw(seed: int) -> None:
    expected = _as_modules(_paper_draws(seed))
    torch.manual_seed(seed)
    from_global = OneLayerTransformer(29).state_dict()
    from_generator = OneLayerTransformer(29, generator=torch.Generator().manual_seed(seed))
    assert from_global.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(from_global[name], value), name
        assert torch.equal(from_generator.state_dict()[name], value), name
    # and the model computes the author's forward pass: x @ W_in, heads (n, h), ...
    w = _paper_draws(seed)
    tokens = with_equals_token(modular_addition_data(29)[0][::37], 29)
    x = w["W_E"][tokens] + w["W_pos"]
    q, k, v = (torch.einsum("nhm,bsm->bsnh", w[n], x) for n in ("W_Q", "W_K", "W_V"))
    scores = torch.einsum("bqnh,bknh->bnqk", q, k) / 4
    scores = scores.masked_fill(torch.ones(3, 3).triu(1).bool(), float("-inf")).softmax(-1)
    z = torch.einsum("bnqk,bknh->bqnh", scores, v).flatten(2)
    x = x + torch.einsum("mn,bsn->bsm", w["W_O"], z)
    x = x + torch.relu(x @ w["W_in"]) @ w["W_out"]
    assert torch.allclose(from_generator(tokens), x @ w["W_U"], atol=1e-5)


def _author_split() -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    state = random.getstate()
    pairs = [(a, b, 29) for a in range(29) for b in range(29)]
    random.seed(0)
    random.shuffle(pairs)
    random.setstate(state)
    return pairs[:int(0.5 * len(pairs))], pairs[int(0.5 * len(pairs)):]


def test_paper_split_is_the_python_random_recipe() -> None:
    train_pairs, test_pairs = _author_split()
    before = random.getstate()
    train_idx, test_idx = paper_transformer_split(29)
    assert random.getstate() == before   # Python's global generator untouched
    pairs, _ = modular_addition_data(29)
    assert len(train_idx) == 420 and len(test_idx) == 421
    assert [tuple(pairs[i].tolist()) + (29,) for i in train_idx] == train_pairs
    assert [tuple(pairs[i].tolist()) + (29,) for i in test_idx] == test_pairs
    with pytest.raises(ValueError, match="strictly between"):
        paper_transformer_split(29, 0.0)


class _BatchRecorder(OneLayerTransformer):
    """Records the token batches it is trained on (forward in training mode)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(29, **kwargs)
        self.batches: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.batches.append(tokens.clone())
        return super().forward(tokens)


def test_dataloader_batch_order_is_the_authors() -> None:
    """The author's loop: after the init, each epoch iterates DataLoader(shuffle=True) over
    the train pairs, and after epochs 0, 20, 40, ... (0-based) its logging iterated the test
    loader and the train loader once more; all of them draw from torch's global generator."""
    train_pairs, test_pairs = _author_split()
    _paper_draws(2)                                  # manual_seed(2) and the nine draws
    train_loader = DataLoader(TensorDataset(torch.tensor(train_pairs)), batch_size=64,
                              shuffle=True)
    test_loader = DataLoader(TensorDataset(torch.tensor(test_pairs)), batch_size=64)
    expected = []
    for epoch in range(45):
        expected += [x for (x,) in train_loader]
        if epoch % 20 == 0:
            for _ in test_loader:
                pass
            for _ in train_loader:
                pass
    generator = torch.Generator().manual_seed(2)
    model = _BatchRecorder(generator=generator)
    pairs, labels = modular_addition_data(29)
    train_idx, test_idx = paper_transformer_split(29)
    train(model, with_equals_token(pairs, 29), labels, train_idx, test_idx, epochs=45,
          lr=0.0, weight_decay=0.0, loss="cross_entropy", batch_size=64, logits_at=-1,
          n_classes=29, snapshot_every=45, eval_every=45, generator=generator,
          batch_order="dataloader", extra_draws_every=20, progress=False)
    assert len(model.batches) == len(expected) == 45 * 7
    for step, (ours, theirs) in enumerate(zip(model.batches, expected)):
        assert torch.equal(ours, theirs), f"step {step}"
    with pytest.raises(ValueError, match="batch_order='dataloader'"):
        train(model, with_equals_token(pairs, 29), labels, train_idx, test_idx, epochs=1,
              lr=0.0, weight_decay=0.0, extra_draws_every=20, progress=False)
    with pytest.raises(ValueError, match="'randperm' or 'dataloader'"):
        train(model, with_equals_token(pairs, 29), labels, train_idx, test_idx, epochs=1,
              lr=0.0, weight_decay=0.0, batch_order="sorted", progress=False)


def test_train_paper_transformer_follows_the_authors_loop() -> None:
    """Three epochs of the author's loop (global generator, DataLoader, AdamW lr 3e-4 and
    weight decay 1.0, cross-entropy on the first 29 logits at "=") end at the same weights."""
    train_pairs, test_pairs = _author_split()
    torch.manual_seed(2)
    reference = OneLayerTransformer(29)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-4, weight_decay=1.0)
    train_x = torch.tensor(train_pairs)
    train_loader = DataLoader(TensorDataset(train_x, (train_x[:, 0] + train_x[:, 1]) % 29),
                              batch_size=64, shuffle=True)
    test_loader = DataLoader(TensorDataset(torch.tensor(test_pairs)), batch_size=64)
    for epoch in range(3):
        for x, y in train_loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(x)[:, 2, :29], y).backward()
            optimizer.step()
        if epoch % 20 == 0:
            for _ in test_loader:
                pass
            for _ in train_loader:
                pass
    model, run = train_paper_transformer(2, epochs=3, snapshot_every=1, progress=False)
    initial = _as_modules(_paper_draws(2))
    for name, value in reference.state_dict().items():
        assert torch.equal(run.snapshots[0][name], initial[name]), name
        assert torch.allclose(model.state_dict()[name], value, atol=1e-6), name
        assert not torch.allclose(value, initial[name], atol=1e-6), name
    assert run.history["epoch"].tolist() == [0, 3]
    recipe = paper_transformer_recipe(2, epochs=3)
    assert recipe.seed == 2 and recipe.epochs == 3 and recipe.lr == 3e-4


class _RunsCode:
    """Unpickling this creates ``marker``: a stand-in for a malicious payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_load_trained_and_checkpoints_refuse_a_pickle_payload(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    model = ModularMLP(P, width=8)
    bad = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "info": {"p": P}, "format": 3,
                "payload": _RunsCode(marker)}, bad)
    with pytest.raises(pickle.UnpicklingError):
        load_trained(bad, model, MLPRecipe(p=P, width=8))
    assert not marker.exists()
    checkpoint = tmp_path / "run.pt"
    torch.save({"payload": _RunsCode(marker)}, checkpoint)
    with pytest.raises(pickle.UnpicklingError):
        train_mlp(2, checkpoint=checkpoint)
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)   # the payload is real: unpickled, it runs
    assert marker.exists()


@pytest.mark.parametrize("change", [
    {"p": 5}, {"seed": 1}, {"epochs": 6}, {"width": 16}, {"train_fraction": 0.5},
    {"draws_on": "meta"}, {"init": "xavier"}, {"optimizer": "SGD"}, {"lr": 0.01},
    {"weight_decay": 0.0}, {"betas": (0.9, 0.99)}, {"loss": "cross_entropy"},
    {"batch_size": 32}, {"batch_order": "dataloader"}])
def test_a_saved_mlp_with_one_setting_changed_is_not_reused(tmp_path: Path,
                                                            change: dict) -> None:
    recipe = MLPRecipe(p=P, width=8, seed=0, epochs=5)
    model = ModularMLP(P, width=8)
    path = save_trained(tmp_path / "mlp.pt", model, recipe)
    fresh = ModularMLP(P, width=8)
    assert not load_trained(path, fresh, dataclasses.replace(recipe, **change))
    assert not torch.equal(fresh.layer1.weight, model.layer1.weight)
    assert load_trained(path, fresh, recipe)                               # the same: reused
    assert torch.equal(fresh.layer1.weight, model.layer1.weight)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TransformerRecipe)])
def test_a_saved_transformer_with_one_setting_changed_is_not_reused(tmp_path: Path,
                                                                    name: str) -> None:
    recipe = paper_transformer_recipe(2, 4000, 29)
    model = OneLayerTransformer(29)
    path = save_trained(tmp_path / "tf.pt", model, recipe)
    value = getattr(recipe, name)
    other = (value + "_other" if isinstance(value, str) else (0.5, 0.5)
             if isinstance(value, tuple) else value / 2 if isinstance(value, float) else value + 1)
    assert not load_trained(path, OneLayerTransformer(29),
                            dataclasses.replace(recipe, **{name: other}))
    assert load_trained(path, OneLayerTransformer(29), recipe)


def test_an_older_format_is_not_reused(tmp_path: Path) -> None:
    recipe = MLPRecipe(p=P, width=8)
    model = ModularMLP(P, width=8)
    old = tmp_path / "old.pt"   # format 2: the recipe as keyword settings
    torch.save({"state_dict": model.state_dict(), "info": {"p": P, "seed": 0, "epochs": 500},
                "format": 2}, old)
    assert not load_trained(old, ModularMLP(P, width=8), recipe)


def test_the_recipes_are_the_papers() -> None:
    """Known answers: the settings as typed from the paper's Sec. 1 and 2 (reference/paper.md)."""
    mlp = paper_mlp_recipe()
    assert (mlp.p, mlp.seed, mlp.width, mlp.train_fraction, mlp.epochs) == (29, 0, 512, 0.7, 500)
    assert (mlp.optimizer, mlp.lr, mlp.weight_decay, mlp.betas) == ("AdamW", 0.05, 0.01,
                                                                     (0.9, 0.999))
    assert (mlp.loss, mlp.batch_size, mlp.draws_on) == ("mse", None, "cpu")   # full batch
    tf = paper_transformer_recipe()
    assert (tf.p, tf.seed, tf.d_model, tf.n_heads, tf.d_mlp, tf.n_ctx) == (29, 2, 64, 4, 256, 3)
    assert (tf.train_fraction, tf.split_seed, tf.epochs, tf.batch_size) == (0.5, 0, 4000, 64)
    assert (tf.optimizer, tf.lr, tf.weight_decay, tf.betas) == ("AdamW", 3e-4, 1.0, (0.9, 0.999))
    assert (tf.loss, tf.batch_order, tf.extra_draws_every) == ("cross_entropy", "dataloader", 20)
    # only the scale moves
    assert paper_mlp_recipe(3, 100, 31) == dataclasses.replace(mlp, seed=3, epochs=100, p=31)
    assert paper_transformer_recipe(5, 10, 31) == dataclasses.replace(tf, seed=5, epochs=10, p=31)


def test_train_recipe_is_the_mlp_recipe_by_hand() -> None:
    recipe = MLPRecipe(p=P, width=16, seed=3, epochs=4)
    model, run = train_recipe(recipe, snapshot_every=2, progress=False)
    reference, train_idx, test_idx = paper_mlp(P, 3, width=16)
    pairs, labels = modular_addition_data(P)
    by_hand = train(reference, pairs, labels, train_idx, test_idx, epochs=4, lr=0.05,
                    weight_decay=0.01, loss="mse", snapshot_every=2, seed=3, progress=False)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert np.array_equal(run.history["test_acc"], by_hand.history["test_acc"])
    with pytest.raises(ValueError, match="only init='paper_mlp'"):
        untrained_model(dataclasses.replace(recipe, init="xavier"))


def test_train_or_load_retrains_for_another_recipe(tmp_path: Path) -> None:
    recipe = MLPRecipe(p=P, width=8, seed=0, epochs=3)
    path = tmp_path / "mlp.pt"
    model, run = train_or_load(recipe, path, progress=False)
    assert run is not None and path.exists()
    again, none = train_or_load(recipe, path, progress=False)
    assert none is None and torch.equal(again.layer1.weight, model.layer1.weight)
    other, retrained = train_or_load(dataclasses.replace(recipe, lr=0.01), path, save=False,
                                     progress=False)
    assert retrained is not None and not torch.equal(other.layer1.weight, model.layer1.weight)
    assert load_trained(path, ModularMLP(P, width=8), recipe)   # save=False kept the file


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path: Path) -> None:
    recipe = MLPRecipe(p=P, width=8, seed=0, epochs=2)
    train_recipe(recipe, checkpoint=tmp_path / "run.pt", progress=False)
    with pytest.raises(ValueError, match="recipe"):
        train_recipe(dataclasses.replace(recipe, width=16), checkpoint=tmp_path / "run.pt",
                     progress=False)


class _PairRecorder(ModularMLP):
    """Records the pair batches it is trained on."""

    def __init__(self) -> None:
        super().__init__(P, width=8)
        self.batches: list[torch.Tensor] = []

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.batches.append(pairs.clone())
        return super().forward(pairs)


def test_randperm_batch_order_is_unchanged() -> None:
    """The default order (the MLP's): each epoch ``train_idx[randperm]`` from one generator
    seeded with ``seed``, cut into ``batch_size`` chunks; nothing else draws from it."""
    pairs, labels = modular_addition_data(P)
    train_idx, test_idx = train_test_split(P * P, 0.5, seed=0)
    model = _PairRecorder()
    train(model, pairs, labels, train_idx, test_idx, epochs=3, lr=1e-2, weight_decay=0.0,
          batch_size=8, seed=5, snapshot_every=3, progress=False)
    generator = torch.Generator().manual_seed(5)
    expected = [pairs[chunk] for _ in range(3)
                for chunk in train_idx[torch.randperm(len(train_idx), generator=generator)]
                .split(8)]
    assert len(model.batches) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(model.batches, expected))


def test_spectra_helpers_against_dense_eigh() -> None:
    model = ModularMLP(P, width=16, generator=torch.Generator().manual_seed(0)).double()
    pairs, _ = modular_addition_data(P)
    kernel, values, vectors = trace_ntk_spectrum(model, pairs)
    dense = np.linalg.eigvalsh(mlp_trace_ntk(model, pairs).numpy())[::-1]
    assert np.allclose(values.numpy(), dense, rtol=1e-8, atol=1e-12)
    assert torch.allclose(kernel @ vectors[:, :3], vectors[:, :3] * values[:3], atol=1e-10)
    for limit in (4096, 1):   # float32 eigh, and the float64 evr route
        top, top_vectors = top_spectrum(kernel, 5, float32_up_to=limit)
        assert np.allclose(top.numpy(), dense[:5], rtol=1e-4)
        assert top_vectors.shape == (P * P, 5)


def test_spectra_over_training_and_transition_window() -> None:
    recipe = MLPRecipe(p=P, width=16, seed=0, epochs=4)
    model, run = train_recipe(recipe, snapshot_every=2, progress=False)
    pairs, _ = modular_addition_data(P)
    epochs, values, vectors = spectra_over_training(run, model, pairs, 3, progress=False)
    assert epochs.tolist() == [0, 2, 4] and vectors.shape == (3, P * P, 3)
    probe = ModularMLP(P, width=16)
    probe.load_state_dict(run.snapshots[2])
    dense = np.linalg.eigvalsh(mlp_trace_ntk(probe, pairs).numpy())[::-1][:3]
    assert np.allclose(values[1].numpy(), dense, rtol=1e-4)
    history = {"epoch": np.array([0, 10, 20, 30, 40]),
               "test_acc": np.array([0.0, 0.1, 0.5, 0.95, 1.0])}
    assert transition_window(history) == (10, 30)
    with pytest.raises(ValueError, match="never exceeds"):
        transition_window({**history, "test_acc": np.zeros(5)})
