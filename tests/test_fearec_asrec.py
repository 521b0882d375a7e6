"""FEARec and ASRec: numbers from the spec's formulas, transcriptions of the reference code, the
same-target sampler, and one training step each."""
from __future__ import annotations

import math
import time

import pytest
import torch

import athwe.models.asrec as asr
import athwe.models.fearec as fe
from athwe.dataset.split import SampleSet
from athwe.models import create_model
from athwe.models.layers import attention_mask, full_width, right_pad

TINY_FEA = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "inner_size": 32}
TINY_AS = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "inner_size": 32}


def sample_set(input_ids: torch.Tensor, target: torch.Tensor, user: torch.Tensor | None = None) -> SampleSet:
    s, n = input_ids.shape
    user = torch.arange(s) if user is None else user
    return SampleSet(input_ids, torch.zeros(s, n, dtype=torch.float64), target, user,
                     torch.zeros(s, dtype=torch.float64))


def random_samples(s: int, n: int, n_items: int, min_len: int = 0, seed: int = 0) -> SampleSet:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, n + 1, (s,), generator=g)
    ids = torch.randint(1, n_items + 1, (s, n), generator=g)
    ids = torch.where(torch.arange(n).unsqueeze(0) >= n - lengths.unsqueeze(1), ids, 0)
    return sample_set(ids, torch.randint(1, n_items + 1, (s,), generator=g))


# ---------------------------------------------------------------------------------------------
# FEARec
# ---------------------------------------------------------------------------------------------

# F = N//2 + 1. g > 1/L: w = g, s = floor(F(1-g)/(L-1)); else w = 1/L, s = F/L.
# layer i: [floor(F(1-w) - i s), floor(F - i s))
BANDS = [
    # N=50, F=26, L=2, g=0.6 > 1/2: s = floor(10.4) = 10 -> [10.4, 26) and [0.4, 16)
    (50, 2, 0.6, [(10, 26), (0, 16)]),
    # N=50, L=4, g=0.6 > 1/4: s = floor(10.4/3) = 3 -> lefts 10.4, 7.4, 4.4, 1.4; rights 26, 23, 20, 17
    (50, 4, 0.6, [(10, 26), (7, 23), (4, 20), (1, 17)]),
    # N=50, L=2, g=0.4 <= 1/2: w = 1/2, s = 13 -> [13, 26), [0, 13)
    (50, 2, 0.4, [(13, 26), (0, 13)]),
    # N=50, L=3, g=0.3 <= 1/3: w = 1/3, s = 26/3 -> [17.33, 26), [8.67, 17.33), [0, 8.67)
    (50, 3, 0.3, [(17, 26), (8, 17), (0, 8)]),
    # N=200, F=101, L=2, g=1.0: s = 0 -> every layer keeps all bins
    (200, 2, 1.0, [(0, 101), (0, 101)]),
    # N=51 (odd), F=26, as N=50
    (51, 2, 0.6, [(10, 26), (0, 16)]),
    # one layer, g=0.6 <= 1: w = 1, s = F -> all bins
    (20, 1, 0.6, [(0, 11)]),
]


@pytest.mark.parametrize("n,layers,g,expected", BANDS)
def test_frequency_ramp_bands(n, layers, g, expected):
    assert [fe.frequency_band(n, layers, i, g) for i in range(layers)] == expected
    model = create_model("fearec", 30, n, {**TINY_FEA, "num_layers": layers, "global_ratio": g})
    assert [(b.attention.left, b.attention.right) for b in model.blocks] == expected
    for b, (lo, hi) in zip(model.blocks, expected):
        # the projection keeps exactly those bins: rfft(P x) is zero outside [lo, hi)
        x = torch.randn(n, 3, dtype=torch.float64)
        spec = torch.fft.rfft(b.attention.proj.double() @ x, dim=0)
        inside = torch.zeros(n // 2 + 1, dtype=torch.bool)
        inside[lo:hi] = True
        if (~inside).any():
            assert spec[~inside].abs().max() < 1e-5
        assert torch.allclose(spec[inside], torch.fft.rfft(x, dim=0)[inside], atol=1e-5)


def test_top_k():
    # floor(factor * ln N): ln 50 = 3.912, ln 200 = 5.298, ln 8 = 2.079
    assert fe.top_k_lags(50, 1) == 3
    assert fe.top_k_lags(50, 10) == 39
    assert fe.top_k_lags(200, 1) == 5
    assert fe.top_k_lags(8, 1) == 2
    assert fe.top_k_lags(8, 10) == 8  # clamped to N
    official = create_model("fearec", 30, 50, TINY_FEA)
    port = create_model("fearec", 30, 50, {**TINY_FEA, "variant": "bsarec"})
    assert [b.attention.top_k for b in official.blocks] == [3, 3]
    assert [b.attention.top_k for b in port.blocks] == [39, 39]


def test_variants_resolve_and_knobs_override():
    c = fe.FEARecConfig()
    assert (c.topk_factor, c.freq_reg, c.padding) == (1.0, "off", "right")
    c = fe.FEARecConfig(variant="bsarec")
    assert (c.topk_factor, c.freq_reg, c.padding) == (10.0, "sequence", "left")
    c = fe.FEARecConfig(variant="bsarec", topk_factor=3, freq_reg="hidden")
    assert (c.topk_factor, c.freq_reg, c.padding) == (3, "hidden", "left")
    from athwe.errors import ConfigError
    with pytest.raises(ConfigError):
        fe.FEARecConfig(variant="nope")
    with pytest.raises(ConfigError):
        fe.FEARecConfig(freq_reg="time")
    with pytest.raises(ConfigError, match="copy_first_block"):
        fe.FEARecConfig(copy_first_block=True)


def _reference_hybrid_attention(layer, x, mask, training, factor):
    """Transcription of sudaada/FEARec HybridAttention.forward (std=True, dual_domain=True, no
    dropout): FFT boxes, per-lag roll / gather loops, band-limited time attention."""
    b, n, d = x.shape
    h = layer.heads
    e = d // h
    q, k, v = (m(x).view(b, n, h, e) for m in (layer.query, layer.key, layer.value))
    idx = list(range(layer.left, layer.right))
    q_fft = torch.fft.rfft(q.permute(0, 2, 3, 1).contiguous(), dim=-1)
    k_fft = torch.fft.rfft(k.permute(0, 2, 3, 1).contiguous(), dim=-1)
    box = torch.zeros(b, h, e, n // 2 + 1, dtype=torch.cfloat)
    for j in idx:
        box[..., j] = q_fft[..., j] * torch.conj(k_fft[..., j])
    corr = torch.fft.irfft(box, dim=-1)
    values = v.permute(0, 2, 3, 1).contiguous()
    top_k = int(factor * math.log(n))
    mean_value = corr.mean(1).mean(1)
    agg = torch.zeros_like(values)
    if training:
        index = torch.topk(mean_value.mean(0), top_k, dim=-1)[1]
        weights = torch.softmax(torch.stack([mean_value[:, index[i]] for i in range(top_k)], -1), -1)
        for i in range(top_k):
            agg = agg + torch.roll(values, -int(index[i]), -1) * weights[:, i].view(b, 1, 1, 1)
    else:
        weights, delay = torch.topk(mean_value, top_k, dim=-1)
        weights = torch.softmax(weights, -1)
        init = torch.arange(n).view(1, 1, 1, n).repeat(b, h, e, 1)
        doubled = values.repeat(1, 1, 1, 2)
        for i in range(top_k):
            pattern = torch.gather(doubled, -1, init + delay[:, i].view(b, 1, 1, 1))
            agg = agg + pattern * weights[:, i].view(b, 1, 1, 1)
    ctx = agg.permute(0, 3, 1, 2).reshape(b, n, d)

    def band(t):
        f = torch.fft.rfft(t.permute(0, 2, 3, 1), dim=-1)
        kept = torch.zeros_like(f)
        kept[..., idx] = f[..., idx]
        return torch.fft.irfft(kept, dim=-1).permute(0, 1, 3, 2)

    scores = band(q) @ band(k).transpose(-1, -2) / math.sqrt(e) + mask
    out = (torch.softmax(scores, -1) @ band(v)).permute(0, 2, 1, 3).reshape(b, n, d)
    ctx = (1 - layer.spatial_ratio) * ctx + layer.spatial_ratio * out
    return layer.norm(x + layer.dense(ctx))


@pytest.mark.parametrize("variant,n", [("official", 50), ("bsarec", 50), ("official", 8)])
@pytest.mark.parametrize("training", [True, False])
def test_hybrid_attention_equals_reference_transcription(variant, n, training):
    torch.manual_seed(0)
    c = fe.FEARecConfig(variant=variant, hidden_size=16, num_heads=2, hidden_dropout=0.0, attn_dropout=0.0)
    for i in range(2):
        layer = fe.HybridAttention(c, n, i).train(training)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.3)
        ids = torch.randint(1, 9, (6, n))
        ids[:2, : n // 2] = 0
        mask = attention_mask(ids, causal=True)
        x = torch.randn(6, n, 16)
        ours = layer(x, mask)
        assert torch.allclose(ours, _reference_hybrid_attention(layer, x, mask, training, c.topk_factor), atol=1e-4)
        rows = torch.tensor([0, n - 1, 3, 1, n // 2, 2])
        assert torch.allclose(layer(x, mask, rows=rows)[:, 0], ours[torch.arange(6), rows], atol=1e-5)


def test_stacked_views_equal_separate_passes():
    """Training encodes (main, aug, sem) as one 3B batch; lags are per view, as three passes."""
    torch.manual_seed(0)
    model = create_model("fearec", 40, 12, {**TINY_FEA, "hidden_dropout": 0.0, "attn_dropout": 0.0}).train()
    views = [random_samples(5, 12, 40, seed=s).input_ids for s in range(3)]
    stacked, _ = model(torch.cat(views), groups=3)
    separate = torch.cat([model(v)[0] for v in views])
    assert torch.allclose(stacked, separate, atol=1e-5)
    mixed, _ = model(torch.cat(views), groups=1)  # one batch mean over 3B picks other lags
    assert not torch.allclose(mixed, separate, atol=1e-5)


@pytest.mark.parametrize("variant", ["official", "bsarec"])
def test_readout_shortcut_equals_full_encoding(variant):
    torch.manual_seed(0)
    model = create_model("fearec", 40, 12, {**TINY_FEA, "variant": variant}).eval()
    ids = random_samples(7, 12, 40, seed=1).input_ids
    with torch.no_grad():
        fast, _ = model(ids)
        full, seq = model(ids, full=True)
    assert torch.allclose(fast, full, atol=1e-5)
    assert seq.shape == (7, 12, 16)


def test_right_pad_and_full_width():
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 0, 9]])
    out, lengths = right_pad(ids)
    assert out.tolist() == [[5, 6, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0], [9, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 0, 1]
    assert full_width(ids, 4) is ids
    assert full_width(ids, 6).tolist() == [[0, 0] + row for row in ids.tolist()]
    assert full_width(ids, 2).tolist() == [row[2:] for row in ids.tolist()]


def _group_set():
    # targets: item 1 x1 (rows 0), item 2 x2 (rows 1, 2), item 3 x5 (rows 3..7); distinct inputs
    ids = torch.arange(1, 8 * 4 + 1).view(8, 4)
    ids[0, :2] = 0
    target = torch.tensor([1, 2, 2, 3, 3, 3, 3, 3])
    return sample_set(ids, target)


def test_same_target_sampler_exact_groups():
    torch.manual_seed(0)
    train = _group_set()
    sampler = fe.SameTargetSampler(train, n_items=5)
    rows = torch.arange(8).repeat(500)  # each training row 500 times
    batch = train.batch(rows)
    torch.manual_seed(1)
    got = sampler.sample_rows(batch.input_ids, batch.user, batch.target)
    assert (train.target[got] == batch.target).all()  # always the same target
    assert (got[rows == 0] == 0).all()  # a group of one: the sample itself
    assert (got[rows != 0] != rows[rows != 0]).all()  # otherwise never itself
    assert (got[rows == 1] == 2).all() and (got[rows == 2] == 1).all()
    # uniform over the 4 other members of the 5-group: 500 draws each, expect 125 +- ~4 sd
    counts = torch.bincount(got[rows == 3], minlength=8)
    assert counts[3] == 0 and counts[[4, 5, 6, 7]].min() > 90 and counts[[4, 5, 6, 7]].max() < 160
    torch.manual_seed(1)
    ids = sampler.sample(batch.input_ids, batch.user, batch.target)
    assert torch.equal(ids, train.input_ids[got])
    # without prepare(), a model draws the positives from the batch itself
    model = create_model("fearec", 5, 4, TINY_FEA)
    torch.manual_seed(2)
    sem = model.same_target_inputs(train.batch(torch.tensor([3, 4, 5, 0])))
    assert not torch.equal(sem[0], train.input_ids[3]) and torch.equal(sem[3], train.input_ids[0])
    assert all(any(torch.equal(sem[r], train.input_ids[j]) for j in (3, 4, 5)) for r in range(3))
    # a target with no training row falls back to the batch row itself
    alien = sample_set(torch.tensor([[0, 7, 8, 9]]), torch.tensor([4]))
    b = alien.batch(slice(None))
    assert sampler.sample_rows(b.input_ids, b.user, b.target).tolist() == [-1]
    assert torch.equal(sampler.sample(b.input_ids, b.user, b.target), b.input_ids)


def test_same_target_sampler_is_vectorised_and_fast():
    train = random_samples(100_000, 50, 5_000, seed=3)
    t0 = time.perf_counter()
    sampler = fe.SameTargetSampler(train, n_items=5_000)
    build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(30):
        batch = train.batch(torch.randint(0, len(train), (256,), generator=g))
        t0 = time.perf_counter()
        rows = sampler.sample_rows(batch.input_ids, batch.user, batch.target)
        sampler.input_ids.index_select(0, rows)
        times.append(time.perf_counter() - t0)
        assert (train.target[rows] == batch.target).all()
    times.sort()
    assert times[len(times) // 2] < 0.010, f"median {times[len(times) // 2] * 1e3:.2f} ms per batch"
    assert build < 2.0


def test_model_positives_come_from_training_rows():
    torch.manual_seed(0)
    train = _group_set()
    model = create_model("fearec", 5, 4, TINY_FEA)
    model.prepare(train)
    batch = train.batch(torch.tensor([3, 4, 0]))
    sem = model.same_target_inputs(batch)
    assert not torch.equal(sem[0], batch.input_ids[0]) and not torch.equal(sem[1], batch.input_ids[1])
    assert torch.equal(sem[2], batch.input_ids[2])  # only member of its group
    for r in range(2):
        assert any(torch.equal(sem[r], train.input_ids[j]) for j in range(3, 8))


def test_info_nce_hand_computed():
    zi = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zj = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # views a=(1,0) b=(0,1) c=(1,1) d=(0,2); pairs (a,c), (b,d); dot products:
    # a: c 1, b 0, d 0 | b: d 2, a 0, c 1 | c: a 1, b 1, d 2 | d: b 2, a 0, c 2
    e = math.e
    rows = [-1 + math.log(2 + e), -2 + math.log(1 + e + e ** 2), -1 + math.log(2 * e + e ** 2),
            -2 + math.log(1 + 2 * e ** 2)]
    assert fe.info_nce(zi, zj, tau=1.0).item() == pytest.approx(sum(rows) / 4, abs=1e-6)
    # tau divides every similarity
    rows2 = [-0.5 + math.log(2 + e ** 0.5), -1 + math.log(1 + e ** 0.5 + e), -0.5 + math.log(2 * e ** 0.5 + e),
             -1 + math.log(1 + 2 * e)]
    assert fe.info_nce(zi, zj, tau=2.0).item() == pytest.approx(sum(rows2) / 4, abs=1e-6)


def test_info_nce_equals_reference_construction():
    torch.manual_seed(0)
    b = 6
    zi, zj = torch.randn(b, 8), torch.randn(b, 8)
    z = torch.cat([zi, zj])
    sim = z @ z.t()
    pos = torch.cat([torch.diag(sim, b), torch.diag(sim, -b)]).view(2 * b, 1)
    mask = torch.ones(2 * b, 2 * b, dtype=torch.bool).fill_diagonal_(False)
    for i in range(b):
        mask[i, b + i] = mask[b + i, i] = False
    logits = torch.cat([pos, sim[mask].view(2 * b, -1)], 1)
    ref = torch.nn.functional.cross_entropy(logits, torch.zeros(2 * b, dtype=torch.long))
    assert fe.info_nce(zi, zj).item() == pytest.approx(ref.item(), rel=1e-6)


def _fearec_loss(args, train, batch, seed=0):
    torch.manual_seed(1)
    model = create_model("fearec", 40, 12, {**TINY_FEA, **args})
    model.prepare(train)
    model.train()
    torch.manual_seed(seed)
    return model, model.loss(batch)


def test_frequency_regulariser_switch_changes_the_loss():
    train = random_samples(64, 12, 40, min_len=1, seed=5)
    batch = train.batch(torch.arange(32))
    model, off = _fearec_loss({"freq_reg": "off"}, train, batch)
    _, hidden = _fearec_loss({"freq_reg": "hidden"}, train, batch)
    _, seq = _fearec_loss({"freq_reg": "sequence"}, train, batch)
    # same RNG stream and code path for off and hidden: the difference is exactly the regulariser
    torch.manual_seed(0)
    sem = model.same_target_inputs(batch)
    read, _ = model(torch.cat([batch.input_ids, batch.input_ids, sem]), groups=3)
    z_aug, z_sem = read[32:64], read[64:]
    term = 0.1 * (torch.fft.rfft(z_aug, dim=-1, norm="ortho")
                  - torch.fft.rfft(z_sem, dim=-1, norm="ortho")).abs().mean()
    assert term.item() > 0
    assert (hidden - off).item() == pytest.approx(term.item(), rel=1e-4, abs=1e-6)
    assert seq.item() != pytest.approx(off.item(), abs=1e-6)
    _, no_contrast = _fearec_loss({"freq_reg": "off", "lmd_sem": 0.0}, train, batch)
    assert no_contrast.item() != pytest.approx(off.item(), abs=1e-6)


@pytest.mark.parametrize("variant", ["official", "bsarec"])
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_fearec_training_step(variant, loss):
    torch.manual_seed(0)
    train = random_samples(200, 12, 40, seed=7)
    model = create_model("fearec", 40, 12, {**TINY_FEA, "variant": variant}, loss_type=loss)
    model.prepare(train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    batch = train.batch(torch.arange(64))
    if loss == "bce":
        batch.neg = torch.randint(1, 41, (64,))
    value = model.loss(batch)
    assert torch.isfinite(value)
    opt.zero_grad()
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        scores = model.scores(train.batch(torch.arange(5)))
        q = model.query_vectors(train.batch(torch.arange(5)))
    assert scores.shape == (5, 41) and torch.allclose(scores, q @ model.item_vectors().t())


def test_fearec_trains_on_tiny_data(tiny_data_dir, tmp_path):
    from athwe.config import resolve_config
    from athwe.training import trainer as tr
    flags = {"data.data_dir": str(tiny_data_dir), "train.runs_dir": str(tmp_path / "runs"), "data.max_seq_length": 8,
             "train.batch_size": 32, "train.epochs": 1, "data.preset": "recbole",
             "train.num_threads": 1}
    cfg = resolve_config("fearec", "tiny", overrides=[f"model_args.{k}={v}" for k, v in TINY_FEA.items()], flags=flags)
    threads = torch.get_num_threads()
    try:  # one thread: on a shared 2-core machine OpenMP waits make small ops ~50x slower
        _, res = tr.train(cfg, printer=lambda s: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= res["test"]["NDCG@10"] <= 1.0


# ---------------------------------------------------------------------------------------------
# ASRec
# ---------------------------------------------------------------------------------------------

def _loop_es(x: torch.Tensor, a: float) -> torch.Tensor:
    es = torch.zeros_like(x)
    prev = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        prev = a * prev + (1 - a) * x[:, t]
        es[:, t] = prev
    return es


@pytest.mark.parametrize("scale", ["exact", "reference"])
def test_fsm_equals_loop_exponential_smoothing(scale):
    torch.manual_seed(0)
    fsm = asr.FSM(4, mix=1.0, es_scale=scale)
    with torch.no_grad():
        fsm.smoothing_weight.fill_(0.3)
        fsm.v0.normal_()
        fsm.v1.normal_()
    fsm = fsm.double()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    a = 1 / (1 + math.exp(-fsm.smoothing_weight.item()))  # w = 0.3 (as stored)
    factor = 1.0 if scale == "exact" else 1 / math.sqrt(15)  # next_fast_len(2*7-1 = 13) = 15
    level = torch.tensor([a ** (t + 1) for t in range(7)], dtype=torch.float64).view(1, 7, 1)
    expected = level * fsm.v0 + fsm.v1 * factor * _loop_es(x, a)
    assert torch.allclose(fsm(x), expected, rtol=0, atol=1e-12)
    fsm.mix = 0.25
    assert torch.allclose(fsm(x), 0.25 * expected + 0.75 * x, rtol=0, atol=1e-12)


def test_fsm_reference_scale_matches_reference_fft():
    """Transcription of the reference FSM (ortho FFT correlation, roll, last N of next_fast_len)."""
    torch.manual_seed(0)
    n = 50
    fsm = asr.FSM(8, mix=1.0, es_scale="reference")
    with torch.no_grad():
        fsm.v1.normal_()
    x = torch.randn(2, n, 8)
    powers = torch.arange(n, dtype=torch.float)
    s = torch.sigmoid(fsm.smoothing_weight)
    weight = ((1 - s) * s ** torch.flip(powers, dims=(0,))).view(1, n, 1)
    fast = 100  # scipy.fftpack.next_fast_len(99)
    out = torch.fft.ifft(torch.fft.fft(x, fast, dim=1, norm="ortho")
                         * torch.fft.fft(weight, fast, dim=1, norm="ortho").conj(),
                         fast, dim=1, norm="ortho").real.roll(-1, dims=1)[:, fast - n:]
    ref = (s ** (powers + 1)).view(1, n, 1) * fsm.v0 + out * fsm.v1
    assert torch.allclose(fsm(x), ref, atol=1e-5)


def test_next_fast_len():
    assert [asr.next_fast_len(n) for n in (1, 13, 99, 399, 97)] == [1, 15, 100, 400, 100]


def test_fsm_ignores_trailing_padding():
    """Right-padded and causal: real positions do not change when 10 more padded columns follow."""
    torch.manual_seed(0)
    fsm = asr.FSM(6, mix=0.7, es_scale="reference")
    fsm.scale = lambda n: 0.1  # compare the same ES scale at both widths (the reference ties it to N)
    x50 = torch.randn(2, 50, 6)
    x60 = torch.cat([x50, torch.randn(2, 10, 6)], 1)
    assert torch.allclose(fsm(x50), fsm(x60)[:, :50], atol=1e-6)


def _spectrum_signal(values, n=8):
    """A real length-n signal whose rfft is the given real spectrum, as (1, n, 1)."""
    return torch.fft.irfft(torch.tensor(values, dtype=torch.complex64), n=n).view(1, n, 1)


# rfft spectrum [0, 4, 1, 3, 2] (N=8): full-spectrum energies 0,16,1,9,4,9,1,16; lower median 4;
# normalised 0,4,.25,2.25,1,2.25,.25,4 -> sorted 0,.25,.25,1,2.25,2.25,4,4. Quantile (linear):
# q=.8: pos 5.6 -> 3.3 keeps {1}; q=.5: pos 3.5 -> 1.625 keeps {1,3}; q=.3: pos 2.1 -> .325 keeps
# {1,3,4}; q=.1: pos .7 -> .175 keeps {1,2,3,4}.
@pytest.mark.parametrize("q,kept", [(0.8, [1]), (0.5, [1, 3]), (0.3, [1, 3, 4]), (0.1, [1, 2, 3, 4])])
def test_ahff_keeps_expected_bins(q, kept):
    x = _spectrum_signal([0.0, 4.0, 1.0, 3.0, 2.0])
    ahff = asr.AHFF(1, 8, 1e-12, q, 0.0, "sample")
    spec = torch.matmul(ahff.dft, x)
    assert torch.nonzero(ahff.keep_mask(spec)[0]).flatten().tolist() == kept
    keep = torch.zeros(5)
    keep[kept] = 1
    expected = torch.fft.irfft(torch.tensor([0.0, 4.0, 1.0, 3.0, 2.0]) * keep, n=8).view(1, 8, 1)
    assert torch.allclose(ahff.filtered(x), expected, atol=1e-5)


def test_ahff_scope():
    a = _spectrum_signal([0.0, 4.0, 1.0, 3.0, 2.0])
    b = _spectrum_signal([5.0, 0.1, 0.1, 0.1, 0.1])
    x = torch.cat([a, b])
    per_sample = asr.AHFF(1, 8, 1e-12, 0.5, 0.0, "sample")
    batch = asr.AHFF(1, 8, 1e-12, 0.5, 0.0, "batch")
    alone = per_sample.keep_mask(torch.matmul(per_sample.dft, a))
    assert torch.equal(per_sample.keep_mask(torch.matmul(per_sample.dft, x))[:1], alone)  # independent of the batch
    assert not torch.equal(batch.keep_mask(torch.matmul(batch.dft, x))[:1], alone)  # reference: batch-wide quantile


def _reference_ahff(ahff, x_in):
    """Transcription of the reference AHFF (torch.fft, batch-wide quantile, no dropout)."""
    x_fft = torch.fft.fft(x_in, dim=1)
    energy = torch.abs(x_fft).pow(2).sum(dim=-1)
    norm = energy / (energy.median(dim=1, keepdim=True)[0] + 1e-6)
    dominant = norm > torch.quantile(norm, ahff.quantile)
    mask = torch.zeros_like(x_fft)
    mask[dominant] = 1
    return ahff.norm(torch.fft.ifft(x_fft * mask, n=x_in.shape[1], dim=1).real + x_in)


def _reference_samm(m, x, mask):
    """Transcription of the reference SAMM (its layers.MultiHeadAttention.forward), no dropout."""
    b, n, d = x.shape
    h = m.heads
    e = d // h

    def t(y):
        return y.view(b, n, h, e).permute(0, 2, 1, 3)

    q, k, v = t(m.query(x)), t(m.key(x)), t(m.value(x))
    ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e) + mask, -1) @ v
    gates = torch.nn.functional.linear(torch.cat([v, ctx], -1), m.w_gate, m.b_gate)
    reset, inp = torch.sigmoid(gates).chunk(2, -1)
    ctx = (1 - inp) * ctx + inp * torch.nn.functional.gelu(ctx + reset * v)
    ctx = ctx.permute(0, 2, 1, 3).reshape(b, n, d)
    small, middle, large = (conv(ctx) for conv in m.convs)
    s, mi, la = (_reference_ahff(m.ahff, y) + y for y in (small, middle, large))
    ctx = m.scales[0] * s + m.scales[2] * la + m.scales[1] * mi
    xn = torch.nn.functional.normalize(ctx, dim=2)
    sim = xn * xn
    sim = torch.softmax(sim, dim=2) + torch.softmax(sim, dim=1)
    out = m.w_orig * ctx - m.w_neg * (sim * ctx)
    return m.norm(m.dense(torch.nn.functional.gelu(out)) + x)


def test_samm_equals_reference_transcription():
    torch.manual_seed(0)
    c = asr.ASRecConfig(hidden_size=16, num_heads=2, attn_dropout=0.0, hidden_dropout=0.0, ahff_dropout=0.0,
                        ahff_scope="batch")
    m = asr.SAMM(c, 10).eval()
    for lin in (m.query, m.key, m.value, m.dense):
        torch.nn.init.normal_(lin.weight, std=0.3)
    ids = torch.randint(1, 9, (4, 10))
    ids[0, 6:] = 0  # right padding
    mask = attention_mask(ids, causal=False)
    x = torch.randn(4, 10, 16)
    assert torch.allclose(m(x, mask), _reference_samm(m, x, mask), atol=1e-4)
    rows = torch.tensor([5, 9, 0, 3])
    assert torch.allclose(m(x, mask, rows)[:, 0], m(x, mask)[torch.arange(4), rows], atol=1e-5)


def test_asrec_reference_initialisation():
    torch.manual_seed(0)
    model = create_model("asrec", 30, 10, {"hidden_size": 32, "num_heads": 4, "inner_size": 32})
    bound = 1 / math.sqrt(2 * 8)
    samm = model.layers[0].samm
    for p in [samm.w_gate, samm.b_gate, samm.w_orig, samm.w_neg, *samm.scales, *[c.weight for c in samm.convs]]:
        assert p.abs().max() <= bound
    assert samm.scales[0].shape == (1, 10, 1) and samm.convs[2].weight.shape == (10, 10, 7)
    assert model.layers[0].v3.item() == 0.5 and samm.ahff.quantile.item() == pytest.approx(0.8)
    assert model.layers[0].attention.query.bias.abs().max() == 0  # Linear: N(0, 0.02), zero bias


def test_asrec_readout_shortcut_and_layout():
    torch.manual_seed(0)
    model = create_model("asrec", 30, 10, TINY_AS).eval()
    ids = random_samples(6, 10, 30, min_len=1, seed=2).input_ids
    with torch.no_grad():
        fast, _ = model(ids)
        full, seq = model(ids, full=True)
        narrow, _ = model(ids[:, -8:])  # narrower inputs are left-padded back to N
    assert torch.allclose(fast, full, atol=1e-5)
    lengths = (ids > 0).sum(1)
    assert torch.allclose(seq[torch.arange(6), lengths - 1], full, atol=1e-6)
    wide = torch.cat([torch.zeros(6, 2, dtype=torch.long), ids], 1)
    with torch.no_grad():
        assert torch.allclose(model(wide)[0], fast, atol=1e-6)  # extra leading zeros are dropped
    assert narrow.shape == fast.shape


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_asrec_training_step(loss):
    torch.manual_seed(0)
    train = random_samples(100, 10, 30, min_len=1, seed=4)
    model = create_model("asrec", 30, 10, TINY_AS, loss_type=loss)
    model.prepare(train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    batch = train.batch(torch.arange(32))
    if loss == "bce":
        batch.neg = torch.randint(1, 31, (32,))
    value = model.loss(batch)
    assert torch.isfinite(value)
    opt.zero_grad()
    value.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert grads["fsm.smoothing_weight"] is not None and grads["layers.0.v3"] is not None
    assert "layers.0.samm.ahff.quantile" not in grads  # a saved buffer: the reference's never gets a gradient
    assert model.state_dict()["layers.0.samm.ahff.quantile"].item() == pytest.approx(0.8)
    opt.step()
    model.eval()
    with torch.no_grad():
        s = model.scores(train.batch(torch.arange(4)))
    assert s.shape == (4, 31) and torch.isfinite(s).all()


def test_yaml_configs_resolve():
    from athwe.config import resolve_config
    from athwe.models import build_model_config

    cfg = build_model_config("fearec", resolve_config("fearec", "LastFM").model_args)
    assert (cfg.variant, cfg.topk_factor, cfg.freq_reg, cfg.global_ratio,
            cfg.spatial_ratio) == ("official", 1.0, "off", 0.6, 0.1)
    port = resolve_config("fearec", "LastFM", overrides=["model_args.variant=bsarec"])
    assert build_model_config("fearec", port.model_args).topk_factor == 10.0
    for ds in ("ml-100k", "Beauty"):
        cfg = build_model_config("asrec", resolve_config("asrec", ds).model_args)
        assert (cfg.fsm_mix, cfg.hidden_size, cfg.inner_size, cfg.num_heads,
                cfg.hidden_dropout) == (1.0, 256, 256, 4, 0.5)
