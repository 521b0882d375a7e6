"""Checks every registered model must pass (run for each name in the registry)."""
from __future__ import annotations

import dataclasses
import io
import re

import pytest
import torch

import athwe.models as models
from athwe.dataset.split import Batch, SampleSet
from athwe.models import create_model, get_entry, list_models
from conftest import random_features

N_ITEMS, N, B = 30, 8, 6
SMALL = {"hidden_size": 16, "inner_size": 32, "num_layers": 2, "num_heads": 2}


def small_config(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(get_entry(name).config_cls)}
    return {k: v for k, v in SMALL.items() if k in fields}


def make_model(name: str, seed: int = 0, loss: str = "ce"):
    torch.manual_seed(seed)
    features = random_features(N_ITEMS) if get_entry(name).needs_features else None
    return create_model(name, N_ITEMS, N, small_config(name), loss, features=features)


def make_batch(seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, N_ITEMS + 1, (B, N), generator=g)
    lengths = torch.tensor([1, 2, 3, 5, 7, 8])
    for i, length in enumerate(lengths.tolist()):
        ids[i, : N - length] = 0
    ts = torch.cumsum(torch.randint(60, 10_000, (B, N), generator=g), 1).double() + 1.6e9
    ts[ids == 0] = 0.0
    target = torch.randint(1, N_ITEMS + 1, (B,), generator=g)
    neg = torch.randint(1, N_ITEMS + 1, (B,), generator=g)
    return Batch(ids, ts, target, torch.arange(B), ts[:, -1] + 100.0, neg)


def one_step(model, batch: Batch) -> torch.Tensor:
    model.train()
    loss = model.loss(batch)
    loss.backward()
    return loss


@pytest.fixture(params=list_models())
def name(request) -> str:
    return request.param


def test_registry_lists_models():
    assert "sasrec" in models.list_models()


def test_shapes_and_inner_product_contract(name):
    model = make_model(name).eval()
    batch = make_batch()
    with torch.no_grad():
        q, items, scores = model.query_vectors(batch), model.item_vectors(), model.scores(batch)
    assert items.shape[0] == N_ITEMS + 1 and q.shape == (B, items.shape[1])
    assert scores.shape == (B, N_ITEMS + 1)
    torch.testing.assert_close(scores, q @ items.t(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_every_parameter_gets_a_gradient(name, loss):
    model = make_model(name, loss=loss)
    one_step(model, make_batch())
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert not missing, f"{name}: parameters without gradient: {missing}"


def test_padding_values_do_not_change_predictions(name):
    model = make_model(name).eval()
    batch = make_batch()
    other = dataclasses.replace(batch, timestamps=batch.timestamps.clone())
    other.timestamps[batch.input_ids == 0] = 12345.0  # what sits under padding must not matter
    with torch.no_grad():
        torch.testing.assert_close(model.scores(batch), model.scores(other))


def test_row_independent_of_batch_neighbours(name):
    model = make_model(name).eval()
    batch = make_batch()
    with torch.no_grad():
        full = model.scores(batch)
        for i in range(B):
            single = model.scores(Batch(*(t[i:i + 1] if t is not None else None for t in dataclasses.astuple(batch))))
            torch.testing.assert_close(single[0], full[i], rtol=1e-5, atol=1e-5)


def test_trimmed_padding_is_exact_when_supported(name):
    model = make_model(name).eval()
    if not model.supports_trimming:
        pytest.skip(f"{name} mixes padded positions (as its reference code does)")
    batch = make_batch()
    row = 3  # 5 real items
    with torch.no_grad():
        full = model.scores(batch)[row]
        width = int((batch.input_ids[row] > 0).sum())
        trimmed = Batch(batch.input_ids[row:row + 1, -width:], batch.timestamps[row:row + 1, -width:],
                        batch.target[row:row + 1], batch.user[row:row + 1], batch.target_time[row:row + 1])
        torch.testing.assert_close(model.scores(trimmed)[0], full, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(name):
    model = make_model(name, seed=0).eval()
    one_step(make_model(name), make_batch())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone = make_model(name, seed=123).eval()
    clone.load_state_dict(torch.load(buf, weights_only=True))
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(clone.scores(batch), model.scores(batch), rtol=0, atol=0)


def test_same_seed_same_result(name):
    losses, states = [], []
    for _ in range(2):
        model = make_model(name, seed=7)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(99)
        for step in range(3):
            opt.zero_grad()
            loss = one_step(model, make_batch(step))
            opt.step()
        losses.append(loss.item())
        states.append(model.state_dict())
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_loss_keeps_no_state_between_calls(name):
    """loss() hands nothing to later calls: no attribute is added or replaced, and training-mode
    scores under a seed are the same before and after a loss (and its backward)."""
    model = make_model(name).train()
    batch = make_batch()
    model.prepare(SampleSet(batch.input_ids, batch.timestamps, batch.target, batch.user, batch.target_time))
    torch.manual_seed(4)
    model.loss(batch)  # a first call may fill constant caches (ATHWE's cluster labels)
    attrs = dict(vars(model))
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        torch.manual_seed(0)
        before = model.scores(batch)
    torch.manual_seed(5)
    model.loss(batch).backward()
    with torch.no_grad():
        torch.manual_seed(0)
        after = model.scores(batch)
    assert vars(model).keys() == attrs.keys() and all(vars(model)[k] is v for k, v in attrs.items())
    assert all(b is buffers[k] for k, b in model.named_buffers())
    assert torch.equal(before, after)


def test_training_step_reduces_loss_on_a_fixed_batch(name):
    model = make_model(name, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch = make_batch()
    model.eval()  # no dropout noise, so the comparison is about learning
    first = model.loss(batch).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    assert model.loss(batch).item() < first


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_gradients_identical_across_repeats_with_threads(name, loss):
    """The same batch gives bit-identical gradients on every backward pass with 2 CPU threads.
    Catches backward kernels that accumulate repeated indices in thread-timing order (the advanced
    indexing `table[ids]` does; F.embedding and index_select do not)."""
    model = make_model(name, seed=5, loss=loss)
    model.eval()  # no dropout draws: every pass computes the same function
    g = torch.Generator().manual_seed(0)
    big_b, n = 512, N
    ids = torch.randint(1, N_ITEMS + 1, (big_b, n), generator=g)  # every item repeated many times
    ts = torch.cumsum(torch.randint(60, 10_000, (big_b, n), generator=g), 1).double() + 1.6e9
    target = torch.randint(1, N_ITEMS + 1, (big_b,), generator=g)
    neg = torch.randint(1, N_ITEMS + 1, (big_b,), generator=g)
    batch = Batch(ids, ts, target, torch.arange(big_b), ts[:, -1] + 100.0, neg)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(11)  # the same draws (ATHWE's temporal contrastive positions) every pass
            model.loss(batch).backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(grads[0][k], other[k]) for k in grads[0]), \
            [k for k in grads[0] if not torch.equal(grads[0][k], other[k])]


def test_lookup_matches_indexing_with_a_reproducible_backward():
    from athwe.models.layers import lookup

    g = torch.Generator().manual_seed(0)
    table = torch.randn(31, 24, generator=g, requires_grad=True)
    ids = torch.randint(0, 31, (512, 40), generator=g)  # 20k ids over 31 rows: heavy repetition
    weight = torch.randn(512, 40, 24, generator=g)
    torch.testing.assert_close(lookup(table, ids), table[ids], rtol=0, atol=0)
    (table[ids] * weight).sum().backward()
    expected, table.grad = table.grad, None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(10):
            (lookup(table, ids) * weight).sum().backward()
            grads.append(table.grad)
            table.grad = None
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(grads[0], expected, rtol=1e-4, atol=1e-4)  # same sums, another order
    assert all(torch.equal(grads[0], other) for other in grads[1:])


def test_ce_padding_adds_the_padding_column_as_a_negative(name):
    """model_args.ce_padding: CE over all n_items + 1 rows (the reference code bases' loss), so the
    loss is larger by exactly the padding column's share; the default leaves padding out."""
    batch = make_batch()
    losses = {}
    for flag in (False, True):
        torch.manual_seed(0)
        features = random_features(N_ITEMS) if get_entry(name).needs_features else None
        model = create_model(name, N_ITEMS, N, {**small_config(name), "ce_padding": flag}, "ce",
                             features=features).eval()
        torch.manual_seed(1)
        losses[flag] = model.loss(batch)
        if flag:
            q, items = model.query_vectors(batch), model.item_vectors()
            logits = q @ items.t()
            without = logits.clone()
            without[:, 0] = float("-inf")
            expected = (torch.logsumexp(logits, 1) - torch.logsumexp(without, 1)).mean()
    torch.testing.assert_close(losses[True] - losses[False], expected, rtol=1e-4, atol=1e-6)
    assert expected > 0


# a parameter the Linear/Embedding/LayerNorm init leaves alone, per model with such parameters
UNTOUCHED_BY_INIT = {"wearec": "layer.detail_scale", "bsarec": "filter.sqrt_beta", "asrec": "samm.w_gate"}


@pytest.mark.parametrize("name", sorted(UNTOUCHED_BY_INIT))
def test_copy_first_block_repeats_the_first_blocks_initial_values(name):
    """model_args.copy_first_block: the reference code bases deep-copy their first block, so the
    parameters the weight init does not redraw start equal in every block; Linear layers are still
    drawn per block. The default draws every block's parameters afresh."""
    for flag in (False, True):
        torch.manual_seed(0)
        model = create_model(name, N_ITEMS, N, {**small_config(name), "copy_first_block": flag}, "ce")
        blocks = model.layers if name == "asrec" else model.blocks
        first, second = blocks[0].state_dict(), blocks[1].state_dict()
        key = UNTOUCHED_BY_INIT[name]
        assert torch.equal(first[key], second[key]) == flag
        linear = next(k for k in first if k.endswith("dense_1.weight"))
        assert not torch.equal(first[linear], second[linear])


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_size", "abc", "hidden_size must be int"), ("hidden_size", 16.0, "hidden_size must be int"),
    ("hidden_size", 0, "hidden_size must be >= 1"), ("hidden_size", -8, "hidden_size must be >= 1"),
    ("num_heads", 0, "num_heads must be >= 1"), ("num_layers", -1, "num_layers must be >= 1"),
    ("inner_size", 0, "inner_size must be >= 1"), ("num_heads", 3, "not a multiple of num_heads"),
    ("hidden_dropout", 2, "hidden_dropout must be in [0, 1)"),
    ("attn_dropout", -0.1, "attn_dropout must be in [0, 1)"),
    ("copy_first_block", 1, "copy_first_block must be bool"), ("layer_norm_eps", 0, "layer_norm_eps must be > 0"),
])
def test_bad_shared_settings_are_config_errors(name, key, value, needle):
    """Every model's config checks the settings all models share, before any layer is built."""
    from athwe.errors import ConfigError
    from athwe.models import build_model_config

    with pytest.raises(ConfigError, match=f"^{name}: .*{re.escape(needle)}"):
        build_model_config(name, {**small_config(name), key: value})
    cfg = build_model_config(name, {**small_config(name), "hidden_dropout": 0, "layer_norm_eps": "1e-12"})
    assert cfg.hidden_dropout == 0.0 and isinstance(cfg.hidden_dropout, float) and cfg.layer_norm_eps == 1e-12


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_rate_scale_seed_and_gradient(p):
    """layers.dropout: drops a fraction p (to sampling noise), scales the kept ones so the mean is
    kept, repeats under the same seed, and its gradient is the same mask and scale."""
    from athwe.models.layers import dropout

    x = torch.ones(400_000, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, p, True)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5 + 2 ** -16
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, kept[0].item())) and abs(kept[0].item() * (1 - p) - 1) < 1e-4
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * m)/dx = m, and x = 1
    torch.manual_seed(3)
    assert torch.equal(dropout(x, p, True), y)
    assert dropout(x, p, False) is x and torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    lanes = (dropout(torch.ones(400_000), 0.5, True) == 0).view(-1, 4).double().mean(0)  # every 16-bit lane unbiased
    assert (lanes - 0.5).abs().max() < 0.01


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_bf16_autocast_step_trains_every_parameter_in_float32(name, loss):
    """train.precision bf16: the step runs under CPU bfloat16 autocast; its loss is finite and near
    the float32 one, every parameter gets a finite gradient, and parameters stay float32."""
    from athwe.training.trainer import autocast_context

    batch = make_batch()
    model = make_model(name, loss=loss).eval()  # no dropout: the two losses see the same network
    with torch.no_grad():
        exact = model.loss(batch).item()
        with autocast_context(torch.device("cpu"), "bf16")():
            mixed = model.loss(batch)
    assert mixed.dtype == torch.float32 and abs(mixed.item() - exact) <= 0.05 * abs(exact) + 1e-3
    model = make_model(name, loss=loss)
    model.train()
    with autocast_context(torch.device("cpu"), "bf16")():
        loss_value = model.loss(batch)
    loss_value.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for _, p in params)
    bad = [n for n, p in params if not torch.isfinite(p.grad).all() or not torch.any(p.grad != 0)]
    assert not bad, f"{name}: parameters without a finite gradient under bf16 autocast: {bad}"
