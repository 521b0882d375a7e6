"""BSARec and WEARec: the filters keep/scale exactly what the spec says, the fast forward (last block
computed for the read-out position only, folded attention, real-DFT read-out) equals a plain
implementation written after the reference code, and the LastFM parameter count."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import athwe.models.bsarec as bsarec_mod
import athwe.models.wearec  # noqa: F401  (registers "wearec")
from athwe.config import resolve_config
from athwe.dataset.split import Batch
from athwe.errors import ConfigError
from athwe.models.base import create_model
from athwe.models.bsarec import low_pass_basis
from athwe.models.wearec import real_dft

TOL = dict(atol=1e-5, rtol=1e-5)


def _ids(b: int, n: int, n_items: int, seed: int = 0) -> torch.Tensor:
    """Left-padded ids: row i has about i*n/b leading padding positions (row 0 none, the last almost all)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n_items + 1, (b, n), generator=g)
    for i in range(b):
        ids[i, : min(n - 1, i * n // b)] = 0
    return ids


def _batch(ids: torch.Tensor, n_items: int, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b = ids.shape[0]
    return Batch(ids, torch.zeros(ids.shape, dtype=torch.float64), torch.randint(1, n_items + 1, (b,), generator=g),
                 torch.arange(b), torch.zeros(b, dtype=torch.float64))


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its initial value (unit LayerNorms, W_base = 1, zero biases would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * (p.detach().abs().mean() + 0.1))


# ---- plain implementations, written after the reference code (BSARec / WEARec repositories) ----

def plain_embedding(model, ids):
    emb = model.embedding
    pos = torch.arange(ids.shape[1])
    return emb.norm(emb.item(ids) + emb.position(pos).unsqueeze(0))


def plain_ff(ff, x):
    return ff.norm(x + ff.dense_2(F.gelu(ff.dense_1(x))))


def plain_mask(ids):
    n = ids.shape[1]
    keep = (ids > 0).long().unsqueeze(1).unsqueeze(2) * torch.tril(torch.ones(n, n, dtype=torch.long)).view(1, 1, n, n)
    return (1.0 - keep.float()) * -10000.0


def plain_attention(att, x, mask, prob_mask=None):
    b, n, d = x.shape
    h = att.heads
    dh = d // h
    q = att.query(x).view(b, n, h, dh).permute(0, 2, 1, 3)
    k = att.key(x).view(b, n, h, dh).permute(0, 2, 3, 1)
    v = att.value(x).view(b, n, h, dh).permute(0, 2, 1, 3)
    probs = torch.softmax(q @ k / math.sqrt(dh) + mask, dim=-1)
    if prob_mask is not None:
        probs = probs * prob_mask
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(b, n, d)
    return att.norm(att.dense(ctx) + x)


def plain_bsarec(model, ids, prob_masks=None):
    x = plain_embedding(model, ids)
    mask = plain_mask(ids)
    cfg = model.config
    for i, block in enumerate(model.blocks):
        n = x.shape[1]
        z = torch.fft.rfft(x, dim=1, norm="ortho")
        z[:, cfg.c // 2 + 1:, :] = 0
        low = torch.fft.irfft(z, n=n, dim=1, norm="ortho")
        dsp = block.filter.norm(low + block.filter.sqrt_beta ** 2 * (x - low) + x)
        gsp = plain_attention(block.attention, x, mask, None if prob_masks is None else prob_masks[i])
        x = plain_ff(block.feed_forward, cfg.alpha * dsp + (1 - cfg.alpha) * gsp)
    return x


def plain_wearec_mix(layer, x):
    b, n, d = x.shape
    k, dh, nb = layer.heads, layer.head_dim, n // 2 + 1
    xh = x.view(b, n, k, dh).permute(0, 2, 1, 3)
    z = torch.fft.rfft(xh, dim=2, norm="ortho")
    p = layer.adaptive_mlp(x.mean(dim=1)).view(b, k, nb, 2)
    gain = layer.filter_base * (1 + p[..., 0:1])
    bias = layer.bias_base + p[..., 1:2]
    x_fft = torch.fft.irfft(z * gain + bias, dim=2, n=n, norm="ortho")
    even, odd = xh[:, :, 0::2, :], xh[:, :, 1::2, :]
    approx, detail = 0.5 * (even + odd), 0.5 * (even - odd) * layer.detail_scale
    y = torch.zeros_like(xh)
    y[:, :, 0::2, :] = approx + detail
    y[:, :, 1::2, :] = approx - detail
    m = (1.0 - layer.alpha) * y + layer.alpha * x_fft
    return m.permute(0, 2, 1, 3).reshape(b, n, d)


def plain_wearec(model, ids):
    x = plain_embedding(model, ids)
    for block in model.blocks:
        x = plain_ff(block.feed_forward, block.layer.norm(plain_wearec_mix(block.layer, x) + x))
    return x


def plain_loss(query, model, target):
    logits = query @ model.embedding.item.weight.t()
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, target)


def _grads(model):
    return {name: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}


# ---- BSARec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("c,kept", [(0, [0]), (1, [0]), (3, [0, 1]), (4, [0, 1, 2]), (5, [0, 1, 2]),
                                    (9, [0, 1, 2, 3, 4])])
def test_bsarec_low_pass_keeps_exactly_bins_below_c_half_plus_one(c, kept):
    n = 12
    t = torch.arange(n, dtype=torch.float64)
    comps = [torch.full((n,), 0.7, dtype=torch.float64)]  # bin 0
    for f in range(1, n // 2 + 1):  # a cosine and a sine per bin (the Nyquist sine is zero)
        comps.append(math.cos(0.3 * f) * torch.cos(2 * math.pi * f * t / n)
                     + math.sin(0.3 * f) * torch.sin(2 * math.pi * f * t / n))
    x = torch.stack(comps)  # (bins, n): one row per frequency
    u = low_pass_basis(n, c)
    low = x @ u @ u.t()  # LPF along positions
    for f in range(n // 2 + 1):
        expect = x[f] if f in kept else torch.zeros(n, dtype=torch.float64)
        torch.testing.assert_close(low[f], expect, atol=1e-12, rtol=0)
    assert u.shape[1] == 2 * len(kept) - 1  # rank: DC once, then a cosine and a sine per kept bin
    # and as torch.fft does it, on random data
    y = torch.randn(3, n, 5, dtype=torch.float64)
    z = torch.fft.rfft(y, dim=1, norm="ortho")
    z[:, c // 2 + 1:] = 0
    torch.testing.assert_close(torch.einsum("nr,mr,bmd->bnd", u, u, y), torch.fft.irfft(z, n=n, dim=1, norm="ortho"))


def test_bsarec_low_pass_with_odd_length_and_nyquist():
    for n in (7, 8):
        for c in range(0, n + 3):
            u = low_pass_basis(n, c)
            y = torch.randn(2, n, 3, dtype=torch.float64)
            z = torch.fft.rfft(y, dim=1, norm="ortho")
            z[:, c // 2 + 1:] = 0
            torch.testing.assert_close(u @ (u.t() @ y), torch.fft.irfft(z, n=n, dim=1, norm="ortho"))


@pytest.mark.parametrize("n,c,heads", [(50, 3, 1), (50, 5, 1), (50, 3, 2), (9, 5, 1), (12, 3, 4)])
def test_bsarec_fast_forward_equals_plain(n, c, heads):
    torch.manual_seed(0)
    model = create_model("bsarec", 40, n,
                         {"hidden_size": 16, "inner_size": 32, "c": c, "num_heads": heads, "alpha": 0.7})
    _perturb(model)
    model.eval()
    ids = _ids(8, n, 40)
    with torch.no_grad():
        ref = plain_bsarec(model, ids)
        read, full = model(ids, full=True)
        last, none = model(ids)
    torch.testing.assert_close(full, ref, **TOL)
    torch.testing.assert_close(read, ref[:, -1], **TOL)
    assert last.shape == (8, 16) and none is None
    torch.testing.assert_close(last, ref[:, -1], **TOL)
    torch.testing.assert_close(model.scores(_batch(ids, 40)), ref[:, -1] @ model.embedding.item.weight.t(), **TOL)


@pytest.mark.parametrize("heads", [1, 2])
def test_bsarec_fast_gradients_equal_plain_with_attention_dropout(monkeypatch, heads):
    """Training mode, hidden dropout off, a fixed attention-probability dropout mask (so the folded
    attention's rowsum(A) term is exercised): loss and every gradient match the plain model."""
    n, b = 20, 8
    torch.manual_seed(1)
    model = create_model("bsarec", 30, n, {"hidden_size": 16, "inner_size": 32, "num_heads": heads,
                                          "hidden_dropout": 0.0, "attn_dropout": 0.3})
    _perturb(model, 1)
    model.train()
    g = torch.Generator().manual_seed(5)
    masks = [(torch.rand(b, heads, n, n, generator=g) > 0.3).float() / 0.7 for _ in model.blocks]
    calls = []

    def fixed_dropout(x, p, training):  # attention probabilities: all rows in block 0, the last in block 1
        if p <= 0:  # the (disabled) hidden dropout shares the function in layers.py
            return x
        i = len(calls)
        calls.append(x.numel())
        m = masks[i] if i == 0 else masks[i][:, :, -1]
        return x * m.reshape(x.shape)

    monkeypatch.setattr(bsarec_mod, "dropout", fixed_dropout)
    if heads > 1:  # the full multi-head path is layers.MultiHeadAttention, which draws its own mask
        monkeypatch.setattr("athwe.models.layers.dropout", fixed_dropout)
    ids = _ids(b, n, 30)
    batch = _batch(ids, 30)
    loss = model.loss(batch)
    loss.backward()
    fast = _grads(model)
    assert calls == [b * heads * n * n, b * heads * n]
    model.zero_grad()
    ref_loss = plain_loss(plain_bsarec(model, ids, masks)[:, -1], model, batch.target)
    ref_loss.backward()
    slow = _grads(model)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=1e-4, msg=name)


# ---- WEARec ---------------------------------------------------------------------------------

def _wearec_layer(n=10, d=8, heads=2, alpha=0.3):
    model = create_model("wearec", 20, n, {"hidden_size": d, "inner_size": 16, "num_heads": heads, "alpha": alpha,
                                          "num_layers": 1, "hidden_dropout": 0.0})
    return model.blocks[0].layer.eval()


def test_wearec_haar_step_identity_at_t1_and_pair_mean_at_t0():
    layer = _wearec_layer(alpha=0.0)  # M = Y_wavelet alone
    x = torch.randn(3, 10, 8)
    with torch.no_grad():
        layer.detail_scale.fill_(1.0)  # D' = D: y_even = A + D = x_even, y_odd = A - D = x_odd
        torch.testing.assert_close(layer.mix(x), x, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.mix_last(x)[:, 0], x[:, -1], atol=1e-6, rtol=0)
        layer.detail_scale.zero_()  # detail dropped: both positions of a pair get the pair mean
        mean = x.view(3, 5, 2, 8).mean(2, keepdim=True).expand(3, 5, 2, 8).reshape(3, 10, 8)
        torch.testing.assert_close(layer.mix(x), mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.mix_last(x)[:, 0], mean[:, -1], atol=1e-6, rtol=0)
        layer.detail_scale.copy_(torch.randn_like(layer.detail_scale))  # general T: per (head, pair, channel)
        t = layer.detail_scale[0].permute(1, 0, 2).reshape(5, 8)  # (pair, channel)
        even, odd = x[:, 0::2], x[:, 1::2]
        expect = torch.stack([(even + odd) / 2 + (even - odd) / 2 * t, (even + odd) / 2 - (even - odd) / 2 * t], 2)
        torch.testing.assert_close(layer.mix(x), expect.reshape(3, 10, 8), atol=1e-6, rtol=0)


def test_wearec_filter_with_zero_mlp_output_is_the_base_filter():
    layer = _wearec_layer(n=10, d=8, heads=2, alpha=1.0)  # M = X_fft alone
    with torch.no_grad():
        layer.adaptive_mlp[2].weight.zero_()
        layer.adaptive_mlp[2].bias.zero_()
        layer.filter_base.copy_(torch.randn(2, 6, 1))
        layer.bias_base.copy_(torch.randn(2, 6, 1))
        x = torch.randn(3, 10, 8)
        expect = torch.empty_like(x)
        for h in range(2):  # per head: rfft over positions, W_base * Z + b_base (real), irfft
            z = torch.fft.rfft(x[:, :, 4 * h:4 * h + 4].double(), dim=1, norm="ortho")
            z = z * layer.filter_base[h].double() + layer.bias_base[h].double()
            expect[:, :, 4 * h:4 * h + 4] = torch.fft.irfft(z, n=10, dim=1, norm="ortho").float()
        torch.testing.assert_close(layer.mix(x), expect, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.mix_last(x)[:, 0], expect[:, -1], atol=1e-5, rtol=0)
        # the defaults (W_base = 1, b_base = -0.1): the signal passes unchanged, plus -0.1 on every bin
        layer.filter_base.fill_(1.0)
        layer.bias_base.fill_(-0.1)
        offset = torch.fft.irfft(torch.full((6,), -0.1, dtype=torch.complex128), n=10, norm="ortho").float()
        torch.testing.assert_close(layer.mix(x), x + offset.view(1, 10, 1), atol=1e-5, rtol=0)


def test_wearec_gain_and_bias_follow_the_mlp_layout():
    """The MLP output is read as (head, bin, [scale, bias]), as in the reference's view(B, k, F, 2)."""
    layer = _wearec_layer(n=10, d=8, heads=2, alpha=1.0)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        layer.adaptive_mlp[2].weight.zero_()
        bias = torch.zeros(2, 6, 2)
        bias[1, 2, 0] = 0.5  # head 1, bin 2: gain 1.5
        bias[0, 0, 1] = 0.3  # head 0, DC: bias -0.1 + 0.3
        layer.adaptive_mlp[2].bias.copy_(bias.reshape(-1))
        gain, b = layer.modulation(x)
    expect_gain = torch.ones(2, 6)
    expect_gain[1, 2] = 1.5
    expect_bias = torch.full((2, 6), -0.1)
    expect_bias[0, 0] = 0.2
    torch.testing.assert_close(gain, expect_gain.expand(2, 2, 6))  # alpha = 1
    torch.testing.assert_close(b, expect_bias.expand(2, 2, 6))


def test_wearec_rejects_odd_sequence_length():
    with pytest.raises(ConfigError, match="max_seq_length must be even"):
        create_model("wearec", 20, 49)
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        create_model("wearec", 20, 50, {"num_heads": 3})
    with pytest.raises(ConfigError, match="alpha"):
        create_model("wearec", 20, 50, {"alpha": 1.5})


def test_real_dft_matrices_reproduce_rfft_and_irfft():
    for n in (8, 9, 50):
        fwd, bins, inv = real_dft(n)
        x = torch.randn(n, 4, dtype=torch.float64)
        z = torch.fft.rfft(x, dim=0, norm="ortho")
        rows = fwd @ x
        nb = n // 2 + 1
        torch.testing.assert_close(rows[:nb], z.real)
        torch.testing.assert_close(rows[nb:], z.imag[1:1 + (n - 1) // 2])
        torch.testing.assert_close(inv @ rows, x)
        assert bins.tolist() == list(range(nb)) + list(range(1, 1 + (n - 1) // 2))


@pytest.mark.parametrize("n,heads,d", [(50, 2, 64), (50, 8, 64), (10, 2, 8), (200, 4, 16)])
def test_wearec_fast_forward_equals_plain(n, heads, d):
    torch.manual_seed(0)
    model = create_model("wearec", 40, n, {"hidden_size": d, "inner_size": 2 * d, "num_heads": heads, "alpha": 0.3})
    _perturb(model)
    with torch.no_grad():  # a T and deltas of order 1, not 0.02: both branches matter
        for block in model.blocks:
            block.layer.detail_scale.mul_(30)
    model.eval()
    ids = _ids(8, n, 40)
    with torch.no_grad():
        ref = plain_wearec(model, ids)
        read, full = model(ids, full=True)
        last, none = model(ids)
    torch.testing.assert_close(full, ref, **TOL)
    torch.testing.assert_close(read, ref[:, -1], **TOL)
    assert last.shape == (8, d) and none is None
    torch.testing.assert_close(last, ref[:, -1], **TOL)
    torch.testing.assert_close(model.scores(_batch(ids, 40)), ref[:, -1] @ model.embedding.item.weight.t(), **TOL)


def test_wearec_fast_gradients_equal_plain():
    n = 16
    torch.manual_seed(2)
    model = create_model("wearec", 30, n, {"hidden_size": 16, "inner_size": 32, "num_heads": 2, "hidden_dropout": 0.0})
    _perturb(model, 2)
    model.train()
    ids = _ids(8, n, 30)
    batch = _batch(ids, 30)
    loss = model.loss(batch)
    loss.backward()
    fast = _grads(model)
    model.zero_grad()
    ref_loss = plain_loss(plain_wearec(model, ids)[:, -1], model, batch.target)
    ref_loss.backward()
    slow = _grads(model)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=1e-4, msg=name)


def test_wearec_parameter_count_lastfm():
    """Spec: 328,674 on LastFM (N=50, k=2). The reference's item table has item_size = max_item + 1
    = 3647 rows (= our n_items + 1; 3647 * 64 = 233,408), and each reference WEARec layer also holds
    `gate_param`, a scalar unused in its 'gate' mode (alpha is a fixed hyperparameter), so 2 of its
    parameters have no effect; ours omits them. (Its first `complex_weight` is overwritten before
    use and is not counted either.) The paper's N=200, k=4 figure, 440,802, follows the same way."""
    def count(n_items, n, heads):
        m = create_model("wearec", n_items, n, {"num_heads": heads})
        return sum(p.numel() for p in m.parameters())

    ours = count(3646, 50, 2)
    assert ours == 328_674 - 2
    assert 3647 * 64 == 233_408
    layer = 2 * 26 + 2 * 26 + (64 * 64 + 64) + (64 * 104 + 104) + 2 * 25 * 32 + 2 * 64  # W_base, b_base, MLP, T, LN
    ff = (64 * 256 + 256) + (256 * 64 + 64) + 2 * 64
    assert ours == 3647 * 64 + 50 * 64 + 2 * 64 + 2 * (layer + ff)
    assert count(3646, 200, 4) == 440_802 - 2


def test_bsarec_parameter_count_matches_reference_layout():
    m = create_model("bsarec", 3646, 50, {})
    # item 3647x64, positions 50x64, LN; per layer: sqrt_beta, 2 LN, Q/K/V/dense, FF
    layer = 64 + 2 * 128 + 4 * (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + 128
    assert sum(p.numel() for p in m.parameters()) == 3647 * 64 + 50 * 64 + 128 + 2 * layer == 337_088


# ---- configs and training --------------------------------------------------------------------

def test_published_settings_in_configs():
    c = resolve_config("bsarec", "Beauty")
    assert (c.train.lr, c.model_args["alpha"], c.model_args["c"], c.model_args["num_heads"]) == (5e-4, 0.7, 5, 1)
    c = resolve_config("bsarec", "LastFM")
    assert (c.train.lr, c.model_args["alpha"], c.model_args["c"], c.model_args["num_heads"]) == (1e-3, 0.9, 3, 1)
    c = resolve_config("wearec", "Beauty")
    assert (c.model_args["hidden_dropout"], c.train.lr, c.model_args["alpha"],
            c.model_args["num_heads"]) == (0.5, 5e-4, 0.2, 8)
    c = resolve_config("wearec", "LastFM")
    assert (c.model_args["hidden_dropout"], c.train.lr, c.model_args["alpha"],
            c.model_args["num_heads"]) == (0.5, 1e-3, 0.3, 2)
    assert c.data.max_seq_length == 50 and c.data.preset == "bsarec"


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads waiting on a busy core make every small
    op slow (a 5 s run took 110 s under load), so these runs use one thread, restored afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["bsarec", "wearec"])
def test_trains_end_to_end_and_learns(name, tiny_data_dir, tmp_path, one_thread):
    from athwe.training.trainer import train

    cfg = resolve_config(name, "tiny", overrides=["model_args.hidden_size=16", "model_args.inner_size=32",
                                                  "model_args.num_layers=1", "model_args.num_heads=2"],
                         flags={"data.data_dir": str(tiny_data_dir), "train.runs_dir": str(tmp_path / "runs"),
                                "data.max_seq_length": 8, "data.preset": "recbole", "train.batch_size": 32,
                                "train.epochs": 12, "train.patience": 12, "train.lr": 0.01,
                                "train.num_threads": 1})
    run, res = train(cfg, printer=lambda s: None, progress=False)
    assert (run / "best.pt").is_file()
    # next item is id+0 or id+1 of 50: chance HR@10 is 0.2
    assert res["test"]["HR@10"] > 0.5


@pytest.mark.parametrize("n", [7, 8, 50])
def test_rfft_ortho_gradient_equals_torch(n):
    from athwe.models.wearec import rfft_ortho

    x = torch.randn(3, 5, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, n // 2 + 1, dtype=torch.complex128)
    torch.testing.assert_close(rfft_ortho(x, n), torch.fft.rfft(x, dim=-1, norm="ortho"))
    ours = torch.autograd.grad(rfft_ortho(x, n), x, g)[0]
    ref = torch.autograd.grad(torch.fft.rfft(x, dim=-1, norm="ortho"), x, g)[0]
    torch.testing.assert_close(ours, ref)
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(rfft_ortho(t, n)), (x,))
