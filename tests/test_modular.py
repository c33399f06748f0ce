"""Modular-addition data, the paper's two models, and a few-epoch smoke test of ``train``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ntk_references import brute_force_ntk, reduce_kernel, rel_err

from entk_helpers import empirical_ntk
from entk_helpers.modular import (
    ModularMLP,
    OneLayerTransformer,
    load_trained,
    mlp_trace_ntk,
    modular_addition_data,
    save_trained,
    train,
    train_test_split,
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
    assert torch.load(path, weights_only=False)["epoch"] == 5   # saved at the end too
    again, run_again = train_mlp(5, checkpoint=path)             # no training: read back
    for key, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    np.testing.assert_array_equal(run_again.history["test_acc"], run.history["test_acc"])
    assert sorted(run_again.snapshots) == sorted(run.snapshots)
    saved_seconds = torch.load(path, weights_only=False)["seconds"]
    assert run_again.seconds == saved_seconds <= run.seconds   # the original run's time
    with pytest.raises(ValueError, match=r"other \['eval_every'\]"):
        train_mlp(5, checkpoint=path, eval_every=2)
    with pytest.raises(ValueError, match="past epochs=3"):
        train_mlp(3, checkpoint=path)


def test_save_and_load_trained_check_the_description(tmp_path: Path) -> None:
    model = ModularMLP(P, width=8)
    path = save_trained(tmp_path / "mlp.pt", model, p=P, seed=0)
    fresh = ModularMLP(P, width=8)
    assert not load_trained(tmp_path / "missing.pt", fresh)
    assert not load_trained(path, fresh, p=P, seed=1)
    assert not torch.equal(fresh.layer1.weight, model.layer1.weight)
    assert load_trained(path, fresh, p=P, seed=0)
    assert torch.equal(fresh.layer1.weight, model.layer1.weight)
