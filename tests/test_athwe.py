"""ATHWE (specs/athwe.md): gradients and saved state, exact loss coverage, wavelets at any length,
time buckets, modality subsets and missing features, the inner-product contract, training."""
from __future__ import annotations

import dataclasses
import io
import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from athwe.config import resolve_config
from athwe.dataset.sequences import load_sequences
from athwe.dataset.split import Batch, SampleSet
from athwe.errors import AthweError, ConfigError
from athwe.models import create_model, resolved_model_args, unused_model_keys
from athwe.models.athwe import ATHWE, WaveletAlign, fingerprint_text, tcl_mask, time_buckets
from athwe.models.layers import Tokens, attention_mask
from athwe.runs import evaluate_run
from athwe.training import trainer as tr
from conftest import random_features, write_random_features, write_tiny_dataset

N_ITEMS, N, B = 30, 10, 8
SMALL = {"hidden_size": 16, "inner_size": 32, "num_layers": 1, "num_heads": 2, "n_clusters": 4}
DAY = 86400.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(args: dict | None = None, seed: int = 0, n: int = N, features=None, loss: str = "ce") -> ATHWE:
    torch.manual_seed(seed)
    feats = random_features(N_ITEMS) if features is None else features
    return create_model("athwe", N_ITEMS, n, {**SMALL, **(args or {})}, loss, features=feats)


def batch(n: int = N, seed: int = 1, lengths: list[int] | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [1, 2, 3, 5, 7, n, n, 4]
    ids = torch.randint(1, N_ITEMS + 1, (len(lengths), n), generator=g)
    for i, length in enumerate(lengths):
        ids[i, : n - length] = 0
    ts = torch.cumsum(torch.randint(60, 30 * 86400, ids.shape, generator=g), 1).double() + 1.6e9
    ts[ids == 0] = 0.0
    target = torch.randint(1, N_ITEMS + 1, (len(lengths),), generator=g)
    neg = torch.randint(1, N_ITEMS + 1, (len(lengths),), generator=g)
    return Batch(ids, ts, target, torch.arange(len(lengths)), ts[:, -1] + 100.0, neg)


def no_grad_params(model) -> list[str]:
    return [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]


# -- parameters, gradients, state --------------------------------------------------------------
ABLATIONS = [
    {},
    {"wavelet": False},
    {"moe": False},
    {"time_routing": False},
    {"phcl_weight": 0.0},
    {"cp_weight": 0.0, "cluster_weight": 0.0, "idcl_weight": 0.0, "diversity_weight": 0.0},
    {"modalities": ["id", "text"]},
    {"modalities": ["id", "image"]},
    {"modalities": ["id"]},
    {"modalities": ["text", "image"]},
]


@pytest.mark.parametrize("args", ABLATIONS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) or "full")
def test_every_parameter_gets_a_gradient_and_is_saved(args):
    model = make(args)
    model.train()
    loss = model.loss(batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert not no_grad_params(model)
    state = model.state_dict()
    assert all(name in state for name, _ in model.named_parameters())
    if args.get("moe", True):
        c = model.config
        assert state["moe.experts"].shape == (c.routed_experts, len(model.modalities) * c.hidden_size)
        assert state["moe.shared"].shape == (c.shared_experts, len(model.modalities) * c.hidden_size)
        assert any(p is model.moe.experts for p in model.parameters())
    # the components an ablation switches off own no parameters
    names = " ".join(state)
    if args.get("wavelet") is False:
        assert "fusion." not in names
    if args.get("moe") is False:
        assert "moe." not in names and "time_routing" not in names
    if args.get("time_routing") is False:
        assert "time_routing" not in names and "moe.router" in names
    if args.get("phcl_weight") == 0.0:
        assert "placeholders" not in names


def test_experts_are_trained():
    model = make()
    before = model.moe.experts.detach().clone(), model.moe.shared.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.loss(batch()).backward()
    opt.step()
    assert not torch.equal(before[0], model.moe.experts) and not torch.equal(before[1], model.moe.shared)


def test_save_load_round_trip_and_feature_fingerprint():
    model = make(seed=0).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    clone = make(seed=5).eval()
    clone.load_state_dict(state)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(clone.scores(b), model.scores(b), rtol=0, atol=0)
    other = random_features(N_ITEMS, seed=9)  # same shapes, other features
    with pytest.raises(AthweError, match="features"):
        make(features=other).load_state_dict(state)


def _refeatured(change, fingerprint: str = "test-again"):
    """random_features(N_ITEMS) under a new fingerprint, with `change(features)` applied."""
    feats = dataclasses.replace(random_features(N_ITEMS), fingerprint=fingerprint)
    feats.text, feats.image, feats.cat = feats.text.clone(), feats.image.clone(), feats.cat.clone()
    feats.text_mask, feats.image_mask = feats.text_mask.clone(), feats.image_mask.clone()
    change(feats)
    return feats


def test_checkpoint_loads_only_onto_its_own_features():
    """A state dict records its features' fingerprint: features under another fingerprint are refused
    with one line naming both, even when their values agree to the last bits; the feature sketch
    that older checkpoints carry is dropped, so they load onto their own features."""
    state = make().state_dict()
    assert "feature_sketch" not in state and fingerprint_text(state["feature_fingerprint"]) == "test-0-30"

    def last_bits(f):
        f.text[1::3, ::2] = torch.nextafter(f.text[1::3, ::2], torch.tensor(math.inf))
    again = make(features=_refeatured(last_bits))
    with pytest.raises(AthweError) as e:
        again.load_state_dict(dict(state))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "test-0-30" in msg and "test-again" in msg
    assert "produced differently (other extractor, settings, items or texts)" in msg
    assert "re-extract them with the run's settings, or train a new run" in msg
    assert fingerprint_text(again.feature_fingerprint) == "test-again"  # the model keeps its own features
    old = {**state, "feature_sketch": torch.zeros(N_ITEMS + 1, 12)}  # saved while sketches were kept
    model = make(seed=4).eval()
    model.load_state_dict(dict(old))
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.scores(b), make().eval().scores(b), rtol=0, atol=0)
    with pytest.raises(AthweError, match="produced differently"):
        make(features=_refeatured(last_bits)).load_state_dict(dict(old))


# -- contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mods", [["id", "text"], ["id", "image"], ["id", "text", "image"], ["id"]])
def test_scores_are_query_dot_items_for_each_modality_subset(mods):
    model = make({"modalities": mods}).eval()
    b = batch()
    with torch.no_grad():
        q, items, scores = model.query_vectors(b), model.item_vectors(), model.scores(b)
    assert q.shape == (len(b), len(mods) * SMALL["hidden_size"]) and items.shape == (N_ITEMS + 1, q.shape[1])
    torch.testing.assert_close(scores, q @ items.t(), rtol=1e-5, atol=1e-5)
    assert torch.all(items[0] == 0)  # padding is not a candidate
    # the 3H layout of spec step 6: [w0 s_id, w1 s_t, w2 s_v] . [E_id, P_t T, P_v V]
    w = torch.softmax(model.fusion_weights, 0) if len(mods) > 1 else torch.ones(1)
    h = SMALL["hidden_size"]
    parts = sum(w[i] * (q[:, i * h:(i + 1) * h] / w[i]) @ items[:, i * h:(i + 1) * h].t() for i in range(len(mods)))
    torch.testing.assert_close(scores, parts, rtol=1e-5, atol=1e-5)


def test_id_only_needs_no_features_but_real_models_do():
    model = create_model("athwe", N_ITEMS, N, {**SMALL, "modalities": ["id"], "cp_weight": 0.0})
    model.loss(batch()).backward()
    with pytest.raises(AthweError, match="athwe extract"):
        create_model("athwe", N_ITEMS, N, SMALL)  # no features: never random ones
    no_image = dataclasses.replace(random_features(N_ITEMS), image=None, image_mask=None)
    with pytest.raises(AthweError, match="image"):
        make(features=no_image)
    with pytest.raises(AthweError, match="rows|shape"):
        make(features=random_features(N_ITEMS + 3))


def test_missing_features_use_a_learned_vector_not_zeros():
    feats = random_features(N_ITEMS)
    model = make(features=feats)
    tables = model.item_tables()
    h = SMALL["hidden_size"]
    for m, mask in (("text", feats.text_mask), ("image", feats.image_mask)):
        missing = torch.nonzero(~mask[1:]).squeeze(1) + 1
        assert len(missing) > 0
        for i in missing.tolist():
            torch.testing.assert_close(tables[m][i], model.missing[m])  # not P(0) = the bias
        assert not torch.allclose(model.missing[m], model.projections[m].bias)
        assert tables[m].shape == (N_ITEMS + 1, h)
    # whatever sits in a missing item's raw row does not reach the scores
    b = batch()
    model.eval()
    with torch.no_grad():
        before = model.scores(b)
        i = int(torch.nonzero(~feats.text_mask[1:])[0]) + 1
        model.text_raw[i] = 123.0
        torch.testing.assert_close(model.scores(b), before)



@pytest.mark.parametrize("mods", [["id", "text", "image"], ["text", "image"]])
def test_query_vectors_compute_only_the_input_items_rows(mods):
    """The query path projects the inputs' feature rows alone (not the whole catalogue), with the
    same values as the tables' rows: padding zero, items without a feature the missing vector."""
    model = make({"modalities": mods})
    model.eval()
    ids = torch.tensor([0, 3, 0, 7, N_ITEMS, 1, 3])
    tables = model.item_tables()
    with torch.no_grad():
        for m, row in zip(model.modalities, model.item_rows(ids)):
            torch.testing.assert_close(row, tables[m][ids])
        b = batch()
        full = model(b.input_ids, b.timestamps)
        alone = model(b.input_ids, b.timestamps, with_items=False)
        assert alone.items is None and alone.tables is None
        torch.testing.assert_close(alone.query, full.query)
        torch.testing.assert_close(model.query_vectors(b), full.query)
        calls = []
        for proj in model.projections.values():  # the cells of the attention windows, not the whole table
            proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
        two = batch(lengths=[1, 3])
        model.query_vectors(two)
        assert calls and max(calls) == len(Tokens.of(two.input_ids).windows.cells) < N_ITEMS

# -- losses over exactly the valid positions ---------------------------------------------------
def test_category_loss_covers_exactly_the_valid_positions():
    feats = random_features(N_ITEMS)
    model = make(features=feats)
    b = batch()
    items = model.item_vectors()
    loss, count = model.category_loss(b.input_ids, items)
    valid = [(r, c) for r in range(b.input_ids.shape[0]) for c in range(N) if b.input_ids[r, c] > 0]
    assert int(count) == len(valid) == int((b.input_ids > 0).sum())  # every item has a category
    ids = torch.tensor([int(b.input_ids[r, c]) for r, c in valid])
    expected = F.binary_cross_entropy_with_logits(model.cat_head(items[ids]), feats.cat[ids])
    torch.testing.assert_close(loss, expected)
    # an item without any category is not a target
    feats.cat[int(b.input_ids[-1, -1])] = 0.0
    model2 = make(features=feats)
    _, count2 = model2.category_loss(b.input_ids, model2.item_vectors())
    assert int(count2) == len(valid) - int((b.input_ids == b.input_ids[-1, -1]).sum())


def test_cluster_loss_covers_exactly_the_valid_positions_with_features():
    feats = random_features(N_ITEMS)
    model = make(features=feats)
    b = batch()
    tables = model.item_tables()
    loss, counts = model.cluster_loss(b.input_ids, tables)
    ids = b.input_ids[b.input_ids > 0]  # flattened valid positions (all of them, not the first rows)
    expected = []
    for k, (m, mask) in enumerate((("text", feats.text_mask), ("image", feats.image_mask))):
        labels = getattr(model, f"{m}_labels")
        assert torch.all(labels[~mask] == -1) and torch.all(labels[mask] >= 0)
        keep = ids[mask[ids]]
        assert int(counts[k]) == len(keep) and 0 < len(keep) < len(ids)
        expected.append(F.cross_entropy(model.cluster_heads[m](tables[m][keep]), labels[keep]))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


@pytest.mark.parametrize("beta", [0.2, 0.29, 0.5, 1.0])
def test_tcl_masks_floor_length_times_beta_valid_positions(beta):
    n = 100
    lengths = torch.arange(0, n + 1)
    valid = torch.arange(n).unsqueeze(0) >= (n - lengths).unsqueeze(1)
    torch.manual_seed(0)
    mask = tcl_mask(valid, beta)
    expected = [math.floor(Fraction(str(beta)) * int(length)) for length in lengths]
    assert mask.sum(1).tolist() == expected
    assert not torch.any(mask & ~valid)


def test_tcl_replaces_the_masked_positions_in_the_model():
    b = batch(lengths=[10, 10, 9, 8, 6, 5, 10, 7])
    args = {"hidden_dropout": 0.0, "attn_dropout": 0.0}
    for beta, same in ((0.0, True), (0.5, False)):
        model = make({**args, "beta": beta}).eval()
        st = model(b.input_ids, b.timestamps, with_tcl=True)
        for m in ("text", "image"):
            assert torch.allclose(st.seq[m], st.augmented[m]) == same
        assert "id" not in st.augmented


def test_loss_is_the_ranking_loss_plus_the_weighted_terms_of_one_forward_pass():
    from athwe.models.athwe import info_nce
    from athwe.models.layers import ranking_loss

    model = make({"phcl_weight": 2.0, "diversity_weight": 0.5, "cp_weight": 0.7, "cluster_weight": 0.3,
                  "idcl_weight": 1.5}).train()
    b = batch()
    torch.manual_seed(3)
    total = model.loss(b)
    torch.manual_seed(3)  # the same dropout draws and temporal-contrast positions
    out = model(b.input_ids, b.timestamps, with_tcl=True)
    c = model.config
    assert sorted(out.augmented) == ["image", "text"] and out.diversity is not None
    tcl = torch.stack([info_nce(out.seq[m], out.augmented[m], b.target, 1.0) for m in ("text", "image")]).mean()
    terms = [ranking_loss(out.query, out.items, b.target, b.neg, "ce"),
             1.5 * info_nce(out.seq["id"], model.item_embedding(b.target), b.target, c.temperature),
             0.7 * model.category_loss(out.ids, out.items)[0],
             0.3 * model.cluster_loss(out.ids, out.tables)[0],
             2.0 * tcl, 0.5 * out.diversity]
    assert all(t > 0 for t in terms)
    torch.testing.assert_close(total, sum(terms), rtol=1e-6, atol=1e-6)


def test_id_contrastive_leaves_same_target_rows_out_of_the_denominator():
    from athwe.models.athwe import info_nce

    torch.manual_seed(0)
    a, bb = torch.randn(4, 8), torch.randn(4, 8)
    target = torch.tensor([3, 5, 3, 7])
    logits = F.normalize(a, dim=-1) @ F.normalize(bb, dim=-1).t() / 0.1
    rows = []
    for i in range(4):
        keep = [j for j in range(4) if j == i or target[j] != target[i]]
        rows.append(-logits[i, i] + torch.logsumexp(logits[i, keep], 0))
    torch.testing.assert_close(info_nce(a, bb, target, 0.1), torch.stack(rows).mean())


# -- time and wavelets -------------------------------------------------------------------------
def test_time_buckets_follow_the_spec():
    gaps = [DAY, 7 * DAY, 30 * DAY, 365 * DAY, -5.0]
    ts = torch.tensor([[0.0, 0.0, 1.6e9] + [1.6e9 + sum(gaps[:k + 1]) for k in range(4)]
                       + [1.6e9 + sum(gaps[:4]) - 5.0]])
    ids = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])
    got = time_buckets(ts, ids > 0, 200, 1.5e7)
    assert got.tolist() == [[0, 0, 0, 1, 8, 32, 176, 0]]  # padding 0; first item dt=1 -> 0; negative gap -> 0
    ts[0, :2] = 5.0  # values under padding do not matter
    assert time_buckets(ts, ids > 0, 200, 1.5e7).tolist() == got.tolist()


def _samples(gap_seconds: float, n_rows: int = 40) -> SampleSet:
    b = batch()
    ids = b.input_ids[5:6].repeat(n_rows, 1)  # a full-length row
    ts = 1.6e9 + gap_seconds * torch.arange(N, dtype=torch.float64).repeat(n_rows, 1)
    return SampleSet(ids, ts.masked_fill(ids == 0, 0.0), torch.ones(n_rows, dtype=torch.long),
                     torch.arange(n_rows), ts[:, -1] + gap_seconds)


def test_training_notes_flag_time_buckets_that_carry_no_signal():
    model = make()
    notes = model.training_notes(_samples(gap_seconds=20.0))  # every gap << time_scale 1.5e7 s
    assert len(notes) == 1 and "100% of the training gaps fall in the lowest time bucket" in notes[0]
    assert "time_scale 1.5e+07" in notes[0] and "median gap 20 s" in notes[0]
    assert "(expert routing and temporal-contrast placeholders)" in notes[0]
    assert "(temporal-contrast placeholders)" in make({"moe": False}).training_notes(_samples(gap_seconds=20.0))[0]
    assert model.training_notes(_samples(gap_seconds=30 * DAY)) == []  # buckets spread: nothing to say
    assert "top time bucket" in model.training_notes(_samples(gap_seconds=3650 * DAY))[0]
    assert make({"time_scale": 30.0}).training_notes(_samples(gap_seconds=20.0)) == []
    # nothing uses the time embedding: no routing by time and no temporal contrast
    assert make({"time_routing": False, "phcl_weight": 0.0}).training_notes(_samples(gap_seconds=20.0)) == []


def test_auto_time_scale_is_a_high_quantile_of_the_positive_gaps_and_is_saved_with_the_model():
    model = make({"time_scale": "auto", "hidden_dropout": 0.0, "attn_dropout": 0.0})
    with pytest.raises(AthweError, match="time_scale is 'auto' and not resolved"):
        model.scores(batch())
    train = _samples(gap_seconds=20.0)
    gaps = 10.0 * torch.arange(40, dtype=torch.float64)
    gaps[:3] = 0.0  # zero gaps are left out: 37 positive gaps 30, 40, ..., 390
    train.timestamps[:, -1] = train.timestamps[:, -2] + gaps
    model.prepare(train)
    assert model.time_scale == 350.0  # the 90% quantile (lower): index int(0.9 * 36) = 32
    notes = model.training_notes(train)
    assert notes == ["athwe: time_scale auto = 5.8 min (90% quantile of the positive gaps in the training data)"]
    # the resolved scale travels in the state dict: a fresh "auto" model scores the same after loading
    model.eval()
    again = make({"time_scale": "auto", "hidden_dropout": 0.0, "attn_dropout": 0.0}).eval()
    again.load_state_dict(model.state_dict())
    assert again.time_scale == 350.0
    with torch.no_grad():
        torch.testing.assert_close(again.scores(batch()), model.scores(batch()))
    # a checkpoint saved before the scale was kept loads with the configured one
    old = {k: v for k, v in make().state_dict().items() if k != "time_scale_s"}
    fixed = make({"time_scale": 60.0})
    fixed.load_state_dict({**old, "feature_fingerprint": fixed.feature_fingerprint})
    assert fixed.time_scale == 60.0
    # a numeric time_scale other than the checkpoint's: the checkpoint's is kept, with a warning
    with pytest.warns(UserWarning, match="trained with time_scale 350 s; it keeps that scale"):
        make({"time_scale": 60.0}).load_state_dict(model.state_dict())
    # no positive gap at all (no timestamps): the reference scale, and the note says so
    flat = make({"time_scale": "auto"})
    flat.prepare(_samples(gap_seconds=0.0))
    assert flat.time_scale == 1.5e7
    with pytest.raises(ConfigError, match="time_scale must be a number of seconds or 'auto'"):
        make({"time_scale": "soon"})
    with pytest.raises(ConfigError, match="time_scale > 0"):
        make({"time_scale": -1.0})


@pytest.mark.parametrize("n", [50, 37, 8, 200])
def test_wavelet_alignment_at_any_length(n):
    fusion = WaveletAlign(3, 8, 4, "db4", [0.1, 1.0, 1.0], 0.5)
    analysis, synthesis, sizes = fusion.operators(n, torch.device("cpu"), torch.float64)
    # perfect reconstruction
    torch.testing.assert_close(analysis @ synthesis, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(2, n, 3, 8)
    # the matrix form equals pytorch-wavelets' transforms applied directly
    b, _, m, h = x.shape
    low, highs = fusion.dwt(x.permute(0, 2, 3, 1).reshape(b, m * h, n))
    assert sizes == [low.shape[-1]] + [c.shape[-1] for c in highs]
    fused = []
    for k, band in enumerate([low, *highs]):
        c = band.reshape(b, m, h, -1)
        gate = torch.sigmoid(torch.einsum("bsil,tsoi->btsol", c, fusion.gates[k]))
        fused.append((gate * c.unsqueeze(1)).sum(2).reshape(b, m * h, -1))
    rec = fusion.idwt((fused[0], fused[1:]))[..., :n].reshape(b, m, h, n).permute(0, 3, 1, 2)
    expected = x + fusion.weight.view(1, 1, m, 1) * (rec - x)
    torch.testing.assert_close(fusion(x), expected, atol=1e-5, rtol=1e-5)
    # and the whole model trains at that length
    model = make(n=n)
    model.loss(batch(n=n, lengths=[1, n, max(1, n // 2), 3])).backward()
    assert not no_grad_params(model)


def test_content_routing_when_time_routing_is_off():
    model = make({"time_routing": False, "hidden_dropout": 0.0, "attn_dropout": 0.0}).eval()
    b = batch()
    other = dataclasses.replace(b, timestamps=b.timestamps * 1.5)
    with torch.no_grad():  # without time routing (and without TCL at inference) timestamps do not matter
        torch.testing.assert_close(model.scores(b), model.scores(other))
    timed = make({"hidden_dropout": 0.0, "attn_dropout": 0.0}).eval()
    with torch.no_grad():
        assert not torch.allclose(timed.scores(b), timed.scores(other))


def test_expert_settings_change_nothing_while_the_experts_are_off():
    experts = {"routed_experts": 3, "moe_topk": 2, "shared_experts": 2, "expert_init_std": 0.5,
               "cosine_lambda": 0.3, "diversity_weight": 0.1}
    a = make({"moe": False, "time_routing": True}, seed=3)
    b = make({"moe": False, "time_routing": False, **experts}, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a.train(), b.train()
    torch.manual_seed(5)
    la = a.loss(batch())
    torch.manual_seed(5)
    lb = b.loss(batch())
    assert torch.equal(la, lb)  # same parameters, same dropout draws, same loss
    assert unused_model_keys("athwe", {"moe": False, "time_routing": True, **experts}) == {"time_routing", *experts}
    assert unused_model_keys("athwe", {"moe": False, "wavelet": False}) == set()
    assert unused_model_keys("athwe", {"time_routing": False, **experts}) == set()  # experts on (the default)
    assert unused_model_keys("sasrec", {"hidden_size": 8}) == set()
    assert unused_model_keys("no-such-model", {}) == set()
    # with the experts on, the routing changes the model
    c = make({"time_routing": False}, seed=3)
    assert "time_routing.weight" in make({"time_routing": True}, seed=3).state_dict()
    assert "time_routing.weight" not in c.state_dict()


def test_config_is_validated():
    with pytest.raises(ConfigError, match="modalities"):
        make({"modalities": ["id", "audio"]})
    with pytest.raises(ConfigError, match="moe_topk"):
        make({"moe_topk": 9})
    with pytest.raises(ConfigError, match="copy_first_block does not apply"):
        make({"copy_first_block": True})
    assert make({"time_scale": "1.5e7"}).config.time_scale == 1.5e7  # YAML 1.1 reads 1.5e7 as a string


# -- with the trainer --------------------------------------------------------------------------
def test_cpu_training_run_and_reload(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    flags = {"data.data_dir": str(data), "data.max_seq_length": 8, "train.epochs": 2, "train.batch_size": 64,
             "train.runs_dir": str(tmp_path / "runs"), "train.device": "cpu"}
    overrides = [f"model_args.{k}={json.dumps(v)}" for k, v in SMALL.items()]
    cfg = resolve_config("athwe", "tiny", overrides=overrides, flags=flags)
    with pytest.raises(AthweError, match="athwe extract --dataset tiny"):
        tr.train(cfg, run_dir=tmp_path / "nofeat", printer=lambda s: None, progress=False)
    write_random_features(data / "tiny", load_sequences(data, "tiny", kcore=cfg.data.kcore).item_tokens)
    run, results = tr.train(cfg, run_dir=tmp_path / "run", printer=lambda s: None, progress=False)
    assert results["epochs_run"] == 2 and 0.0 <= results["test"]["NDCG@10"] <= 1.0
    again = evaluate_run(run)
    assert again["test"] == pytest.approx(results["test"])
    state = torch.load(run / "best.pt", weights_only=True)
    assert "moe.experts" in state and "moe.shared" in state
    # time_scale auto: resolved from the training gaps when training starts, kept in the checkpoint,
    # so evaluating the run later gives the same figures
    auto = resolve_config("athwe", "tiny", overrides=overrides + ["model_args.time_scale=auto"], flags=flags)
    heard: list[str] = []
    run, results = tr.train(auto, run_dir=tmp_path / "auto", printer=heard.append, progress=False)
    scale = float(torch.load(run / "best.pt", weights_only=True)["time_scale_s"])
    assert 0.0 < scale < 1e12 and any("time_scale auto = " in line for line in heard)
    assert evaluate_run(run)["test"] == pytest.approx(results["test"])


def test_training_after_a_first_call_in_inference_mode():
    model = make().eval()
    with torch.inference_mode():
        model.scores(batch())  # e.g. an evaluation before the first training step
    model.train()
    model.loss(batch()).backward()
    assert not no_grad_params(model)


def test_athwe_demo_and_reference_settings():
    cfg = resolve_config()  # `athwe train` with no arguments
    assert cfg.model == "athwe" and cfg.data.dataset == "demo" and cfg.data.preset == "recbole"
    assert cfg.model_args["modalities"] == ["id", "text"]  # the demo's images need CLIP weights offline
    ref = resolve_config("athwe", "Home_and_Kitchen")
    assert (ref.data.kcore, ref.train.batch_size, ref.train.epochs, ref.train.patience) == (5, 1024, 20, 30)
    ref_args, demo_args = (resolved_model_args("athwe", c.model_args) for c in (ref, cfg))  # dataclass defaults in
    assert ref_args["modalities"] == ["id", "text", "image"] and ref_args["moe_topk"] == 6
    assert ref_args["time_routing"] is True and demo_args["time_routing"] is True
    # ml-100k routes on content with the auto time scale (chosen on validation NDCG@10)
    # the ID-only baselines on the mission's dataset share ATHWE's protocol, split and item map
    for name in ("sasrec", "wearec", "bsarec", "fearec", "asrec"):
        base = resolve_config(name, "Home_and_Kitchen")
        assert (base.data.preset, base.data.kcore, base.data.max_seq_length) == (
            ref.data.preset, ref.data.kcore, ref.data.max_seq_length), name
    assert resolve_config("sasrec", "Home_and_Kitchen").train.valid_metric == ref.train.valid_metric
    ml = resolve_config("athwe", "ml-100k")
    assert (ml.model_args["time_routing"], ml.model_args["time_scale"], ml.model_args["modalities"]) == (
        False, "auto", ["id", "text"])


def test_bf16_autocast_chooses_the_experts_fp32_chooses():
    """Under bfloat16 autocast the routing (time projection, router, softmax, top-k) stays in float32,
    so with a near-uniform router the experts chosen are those of the fp32 pass on the same weights;
    the diversity term's Gram matrix is float32 too."""
    model = make({"hidden_size": 64, "inner_size": 128}, n=50)
    with torch.no_grad():
        model.moe.router.weight.mul_(1e-3)  # near-uniform: bf16 logits would tie and reorder the top 6
    model.eval()
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    model.moe.register_forward_hook(lambda mod, args, out: seen.append((mod.route(args[1])[1], out[1], args[2])))
    b = batch(n=50, lengths=[50, 40, 30, 20, 10, 5, 50, 45])
    with torch.no_grad():
        model(b.input_ids, b.timestamps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(b.input_ids, b.timestamps)
    (fp32, div32, valid), (bf16, div16, _) = seen  # the experts see the kept tokens; valid: the real items
    assert int(valid.sum()) == int((b.input_ids > 0).sum())
    same = (fp32.sort(-1).values == bf16.sort(-1).values).all(-1)[valid].double().mean()
    assert same >= 0.99
    assert div16.dtype == torch.float32
    torch.testing.assert_close(div16, div32, rtol=0.05, atol=1e-3)


def grid_reference(model: ATHWE, ids: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 1-6 of specs/athwe.md on the whole (B, L) grid, padding positions included, with the
    model's own modules (eval mode): the query vectors and the experts' diversity term."""
    c, (b, n) = model.config, ids.shape
    valid = ids > 0
    tables = model.item_tables()
    pos = model.position(torch.arange(model.max_seq_length - n, model.max_seq_length))
    x = torch.stack([tables[m][ids] for m in model.modalities], 2) + pos.view(1, n, 1, -1)
    x = x * valid.view(b, n, 1, 1)
    if model.fusion is not None:
        x = model.fusion(x)
    tau = model.time_embedding(time_buckets(ts, valid, c.time_span, model.time_scale)) if c.moe else None
    diversity = None
    if c.moe:
        flat = x.reshape(b * n, -1)
        routing = F.relu(model.time_routing(tau)).reshape(b * n, -1) if c.time_routing else flat
        out, diversity = model.moe(flat, routing, valid.reshape(-1))
        x = out.view(x.shape)
    mask = attention_mask(ids, causal=True)
    reads = []
    for i, m in enumerate(model.modalities):
        z = model.norms[m](x[:, :, i])
        for block in model.encoders[m]:
            z = block(z, mask)
        reads.append(z[:, -1])
    w = torch.softmax(model.fusion_weights, 0) if model.fusion_weights is not None else torch.ones(1)
    return torch.cat([w[i] * r for i, r in enumerate(reads)], -1), diversity


@pytest.mark.parametrize("args", [{}, {"time_routing": False}, {"moe": False, "modalities": ["id", "image"]}],
                         ids=["full", "content_routing", "no_moe"])
def test_packed_forward_equals_the_whole_grid_computation(args):
    """The model computes the experts and encoders on the kept tokens only and attention in
    windows: every row with items gets the query vector of the computation over the whole grid."""
    model = make({"num_layers": 2, **args}, n=24).eval()
    b = batch(n=24, lengths=[1, 2, 3, 9, 17, 24, 24, 6])
    with torch.no_grad():
        out = model(b.input_ids, b.timestamps)
        query, diversity = grid_reference(model, b.input_ids, b.timestamps)
    torch.testing.assert_close(out.query, query, rtol=1e-5, atol=1e-5)
    if diversity is not None:
        torch.testing.assert_close(out.diversity, diversity, rtol=1e-5, atol=1e-6)
