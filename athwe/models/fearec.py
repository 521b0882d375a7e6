"""FEARec (Du et al., SIGIR 2023): frequency-enhanced hybrid attention with same-target contrast.

Per layer i of L (specs/id-only-models.md, section FEARec; reference code sudaada/FEARec
``recbole/model/layers.py: HybridAttention`` and the BSARec port ``src/model/fearec.py``):

* Frequency ramp: the layer keeps the rfft bins ``[left_i, right_i)`` of ``frequency_band``.
* Auto-correlation branch: ``R = irfft(band(rfft(Q)) * conj(rfft(K)))`` over time, averaged over
  heads and channels to a (B, N) lag score. ``top_k = floor(topk_factor * ln N)`` lags; training
  uses the lags of the batch-mean score (each sample keeps its own softmax weights over them),
  evaluation each sample's own top lags. ``V_ac[t] = sum_j w_j V[(t + tau_j) mod N]``
  (= ``roll(V, -tau_j)``), computed as one circulant (B, N, N) matrix times V (no loop over lags).
  The FFTs are evaluated as exactly equivalent real matrix products (see ``HybridAttention``);
  ``tests/test_fearec_asrec.py`` checks the layer against a transcription of the reference.
* Time branch (``dual_domain``): Q, K, V band-limited to the same bins (the reference's
  ``std=True``, as in its published run script) then causal + padding masked scaled dot-product
  attention. ``ctx = (1 - r) V_ac + r V_t``; ``LN(X + Dropout(Dense(ctx)))``; FeedForward.

Loss (contrast mode ``us_x`` of the reference, the only one its published run uses):
``CE + lmd_sem * InfoNCE(z_aug, z_sem)`` with z_aug a second dropout pass of the same input and
z_sem the encoding of a different training sequence with the same target (the sample itself when
there is none); InfoNCE is NT-Xent over the 2B views with dot similarity / tau. The optional
frequency regulariser adds ``freq_reg_weight * mean |rfft(z_aug) - rfft(z_sem)|`` (ortho norm),
either over the hidden axis of the read-out vectors (official code's ``fredom``) or over the
sequence axis of the whole output sequences (BSARec port).

The three views (main, aug, sem) are encoded in one 3B batch; the training-time batch-mean lags
are computed per view (``groups``), exactly as three separate forward passes would.

Same-target positives (``SameTargetSampler``): ``prepare(train)`` keeps the training SampleSet and
sorts its row indices by target once (plus per-item counts and group starts). At loss time each
batch row draws a random member of its target's group with vectorised ops; if the drawn row is
the sample itself (same user and identical input ids), it redraws uniformly among the other
members by skipping that rank, so the positive is uniform over the *other* rows of the group.
A group of one (only the sample itself) yields the sample itself, as the reference does. Without
``prepare`` (a model driven directly on batches) the positives come from the batch itself.

Variants (``variant``): ``official`` (sudaada/FEARec: topk_factor 1, regulariser off, RecBole
layout: sequences right-padded internally so the first item is position 0 and the read-out is at
length-1) and ``bsarec`` (the BSARec-code port behind WEARec's Table 1: topk_factor hard-coded 10,
regulariser on along the sequence axis, left padding with the read-out at the last column).
``topk_factor``, ``freq_reg`` and ``padding`` left at None take the variant's value; set them to
override one knob. The FFT branches see the padded positions (as in both reference codes), so
outputs depend on the padding layout and trimming is not supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from athwe.dataset.split import Batch, SampleSet
from athwe.errors import ConfigError
from athwe.models.base import EncoderConfig, SequentialRecommender, register_model
from athwe.models.layers import (Dropout, FeedForward, SequenceEmbedding, attention_mask, dropout, full_width,
                                 init_weights, ranking_loss, right_pad)

VARIANTS = {
    "official": {"topk_factor": 1.0, "freq_reg": "off", "padding": "right"},
    "bsarec": {"topk_factor": 10.0, "freq_reg": "sequence", "padding": "left"},
}
FREQ_REGS = ("off", "hidden", "sequence")
PADDINGS = ("right", "left")


@dataclass
class FEARecConfig(EncoderConfig):
    variant: str = "official"  # official | bsarec (see module docstring)
    global_ratio: float = 0.6  # frequency ramp width g
    dual_domain: bool = True  # add the time-domain attention branch
    band_limit_time: bool = True  # band-limit Q,K,V of the time branch (reference `std`)
    spatial_ratio: float = 0.1  # r: weight of the time branch
    topk_factor: float | None = None  # None: variant's (official 1, bsarec 10)
    lmd_sem: float = 0.1  # weight of InfoNCE(z_aug, z_sem); 0 disables the contrastive term
    tau: float = 1.0
    sim: str = "dot"  # dot | cos
    freq_reg: str | None = None  # off | hidden | sequence; None: variant's (official off, bsarec sequence)
    freq_reg_weight: float = 0.1
    padding: str | None = None  # right | left; None: variant's (official right, bsarec left)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"fearec variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        for key, value in VARIANTS[self.variant].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.freq_reg not in FREQ_REGS:
            raise ConfigError(f"fearec freq_reg {self.freq_reg!r} is not one of {', '.join(FREQ_REGS)}")
        if self.padding not in PADDINGS:
            raise ConfigError(f"fearec padding {self.padding!r} is not one of {', '.join(PADDINGS)}")
        if self.sim not in ("dot", "cos"):
            raise ConfigError(f"fearec sim {self.sim!r} is not one of dot, cos")
        if not 0.0 < self.global_ratio <= 1.0:
            raise ConfigError(f"fearec global_ratio must be in (0, 1], got {self.global_ratio}")
        if self.topk_factor <= 0:
            raise ConfigError(f"fearec topk_factor must be > 0, got {self.topk_factor}")
        if self.copy_first_block:
            raise ConfigError("fearec: copy_first_block does not apply (each layer keeps its own frequency band, "
                              "and the reference builds every layer afresh)")


def frequency_band(n: int, num_layers: int, layer: int, global_ratio: float) -> tuple[int, int]:
    """rfft bins [left, right) kept by `layer` (0-based) of `num_layers` for sequence length `n`.

    F = n//2 + 1. If g > 1/L: w = g, s = floor(F (1 - g) / (L - 1)); else w = 1/L, s = F/L.
    left = floor(F (1 - w) - i s), right = floor(F - i s) (truncation as the reference's int(),
    identical to floor for these non-negative values; s = 0 for a single layer)."""
    f = n // 2 + 1
    if global_ratio > 1 / num_layers:
        w = global_ratio
        s = (f * (1 - global_ratio)) // (num_layers - 1) if num_layers > 1 else 0.0
    else:
        w = 1 / num_layers
        s = f / num_layers
    left = int(f * (1 - w) - layer * s)
    right = int(f - layer * s)
    return max(left, 0), min(right, f)


def top_k_lags(n: int, topk_factor: float) -> int:
    """Number of auto-correlation lags: floor(topk_factor * ln n), clamped to [1, n]."""
    return min(max(int(topk_factor * math.log(n)), 1), n)


def info_nce(z_i: torch.Tensor, z_j: torch.Tensor, tau: float = 1.0, sim: str = "dot") -> torch.Tensor:
    """NT-Xent over the 2B views: row i's positive is its pair (i +- B), its negatives every
    other view except itself; similarity z.z'/tau (dot) or cos/tau. Mean over the 2B rows."""
    b = z_i.shape[0]
    z = torch.cat([z_i, z_j], 0)
    if sim == "cos":
        z = F.normalize(z, dim=-1)
    logits = (z @ z.t()) / tau
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    pair = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, pair)


class SameTargetSampler:
    """Random same-target training sequences for a batch, fully vectorised.

    Built once from the training SampleSet: row indices sorted by target (`order`), per-item group
    sizes (`counts`) and group starts (`starts`). `sample` draws one member of each row's target
    group; where the draw is the row itself (same user, identical input ids) it redraws among the
    other members by skipping the drawn rank, which makes the positive uniform over the group's
    other rows. A target with a single member (the row itself) returns the row itself; a target
    absent from the training set returns the batch row's own input."""

    def __init__(self, train: SampleSet, n_items: int | None = None):
        target = train.target
        n = int(target.max()) + 1 if n_items is None else n_items + 1
        self.input_ids = train.input_ids
        self.user = train.user
        self.order = torch.argsort(target, stable=True)
        self.counts = torch.bincount(target, minlength=n)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def to(self, device: torch.device | str) -> "SameTargetSampler":
        for name in ("input_ids", "user", "order", "counts", "starts"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sample_rows(self, input_ids: torch.Tensor, user: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) training-row indices of the positives (-1 where the target has no training row).
        (index_select throughout: tensor[idx] can stall for tens of ms on a loaded CPU.)"""
        count = self.counts.index_select(0, target)
        start = self.starts.index_select(0, target)
        last = len(self.order) - 1
        u = (torch.rand(count.shape, device=count.device) * count).long()
        u = torch.minimum(u, (count - 1).clamp(min=0))
        row = self.order.index_select(0, (start + u).clamp(max=last))
        is_self = (self.input_ids.index_select(0, row) == input_ids).all(1) & (self.user.index_select(0, row) == user)
        # redraw uniformly among the other count-1 members: rank u2 in [0, count-1), skipping u
        u2 = (torch.rand(count.shape, device=count.device) * (count - 1)).long()
        u2 = torch.minimum(u2, (count - 2).clamp(min=0))
        u2 = u2 + (u2 >= u).long()
        other = self.order.index_select(0, (start + u2).clamp(max=last))
        row = torch.where(is_self & (count > 1), other, row)
        return torch.where(count > 0, row, torch.full_like(row, -1))

    def sample(self, input_ids: torch.Tensor, user: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, N) input ids of the same-target positives."""
        row = self.sample_rows(input_ids, user, target)
        out = self.input_ids.index_select(0, row.clamp(min=0))
        return torch.where((row >= 0).unsqueeze(1), out, input_ids)


def band_projection(n: int, left: int, right: int) -> torch.Tensor:
    """(n, n) real matrix P with P @ x = irfft(band * rfft(x), n) over the time axis, keeping rfft
    bins [left, right). P is circulant, symmetric and idempotent (an orthogonal projection)."""
    band = torch.zeros(n // 2 + 1, dtype=torch.float64)
    band[left:right] = 1.0
    eye = torch.eye(n, dtype=torch.float64)
    return torch.fft.irfft(torch.fft.rfft(eye, dim=0) * band.unsqueeze(1), n=n, dim=0).float()


class HybridAttention(nn.Module):
    """One FEARec mixer: auto-correlation over the layer's band + band-limited time attention.

    The FFTs of the reference are replaced by exactly equivalent real matrix products (faster on
    CPU at the short lengths used here): band limiting is the projection `band_projection`, and
    the channel-averaged auto-correlation irfft(band(Qf) conj(Kf))[tau] equals
    (1/d) sum_t (P Q)[(t + tau) mod N] . K[t], the circular diagonal sums of (P Q) K^T. The lag
    aggregation sum_j w_j roll(V, -tau_j) is the circulant matrix C[t, s] = c[(s - t) mod N] with
    c = sum_j w_j onehot(tau_j), applied to V."""

    def __init__(self, c: FEARecConfig, n: int, layer: int):
        super().__init__()
        d = c.hidden_size
        if d % c.num_heads:
            raise ConfigError(f"hidden_size {d} is not a multiple of num_heads {c.num_heads}")
        self.heads = c.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        self.dropout = Dropout(c.hidden_dropout)
        self.norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.attn_dropout = c.attn_dropout
        self.dual_domain = c.dual_domain
        self.band_limit_time = c.band_limit_time
        self.spatial_ratio = c.spatial_ratio
        self.top_k = top_k_lags(n, c.topk_factor)
        self.left, self.right = frequency_band(n, c.num_layers, layer, c.global_ratio)
        self.register_buffer("proj", band_projection(n, self.left, self.right), persistent=False)
        t = torch.arange(n)
        # diag[tau, t] = (t + tau) mod N (diagonal sums); circ[t, s] = (s - t) mod N (circulant)
        self.register_buffer("diag", (t.view(1, n) + t.view(n, 1)) % n, persistent=False)
        self.register_buffer("circ", (t.view(1, n) - t.view(n, 1)) % n, persistent=False)

    def extra_repr(self) -> str:
        return f"bins=[{self.left}, {self.right}), top_k={self.top_k}"

    def lags(self, corr: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k) lags and their softmax weights from the (B, N) lag scores."""
        if self.training:
            b, n = corr.shape
            mean = corr.view(groups, b // groups, n).mean(1)  # one batch mean per view
            lag = mean.topk(self.top_k, dim=-1).indices.repeat_interleave(b // groups, 0)
            score = corr.gather(1, lag)
        else:
            score, lag = corr.topk(self.top_k, dim=-1)
        return lag, torch.softmax(score, dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, groups: int = 1,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, d) -> (B, N, d); with `rows` (B,) only those positions, (B, 1, d)."""
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads
        q, k, v = self.query(x), self.key(x), self.value(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], h, dh).transpose(1, 2)

        if self.dual_domain and self.band_limit_time:
            tq, tk, tv = torch.matmul(self.proj, torch.cat([q, k, v], -1)).split(d, -1)
            qh, kh = split(tq), split(tk)
            raw = qh @ kh.transpose(-1, -2)  # (B, H, N, N); summed over heads = (PQ)(PK)^T
            gram = raw.sum(1)
        else:
            tq, tk, tv = q, k, v
            gram = torch.matmul(self.proj, q) @ k.transpose(1, 2)  # (PQ) K^T
            raw = None
        # lag score corr[tau] = mean over channels of sum_t (PQ)[t + tau] . K[t]
        corr = gram.gather(1, self.diag.expand(b, n, n)).sum(-1) / d  # (B, N)
        lag, w = self.lags(corr, groups)
        coef = torch.zeros(b, n, dtype=w.dtype, device=x.device).scatter_add(1, lag, w)
        circ = self.circ if rows is None else self.circ.index_select(0, rows)  # (N, N) or (B, N)
        agg = coef.gather(1, circ.reshape(1, -1).expand(b, -1) if rows is None else circ).view(b, -1, n)
        ctx = agg @ v  # (B, R, d) = sum_j w_j roll(V, -tau_j) at the requested positions
        if self.dual_domain:
            m = mask
            if rows is not None:
                m = mask.expand(b, 1, n, n).gather(2, rows.view(b, 1, 1, 1).expand(b, 1, 1, n))
            if raw is not None:
                scores = raw if rows is None else raw.gather(2, rows.view(b, 1, 1, 1).expand(b, h, 1, n))
            else:
                qrows = tq if rows is None else tq.gather(1, rows.view(b, 1, 1).expand(b, 1, d))
                scores = split(qrows) @ split(tk).transpose(-1, -2)
            att = torch.softmax(scores * dh ** -0.5 + m, dim=-1)
            if self.training and self.attn_dropout > 0:
                att = dropout(att, self.attn_dropout, True)
            out = (att @ split(tv)).transpose(1, 2).reshape(b, -1, d)
            ctx = (1 - self.spatial_ratio) * ctx + self.spatial_ratio * out
        res = x if rows is None else x.gather(1, rows.view(b, 1, 1).expand(b, 1, d))
        return self.norm(res + self.dropout(self.dense(ctx)))


class FEARecBlock(nn.Module):
    def __init__(self, c: FEARecConfig, n: int, layer: int):
        super().__init__()
        self.attention = HybridAttention(c, n, layer)
        self.feed_forward = FeedForward(c.hidden_size, c.inner_size, c.hidden_dropout, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, groups: int = 1,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed_forward(self.attention(x, mask, groups, rows))


@register_model("fearec", FEARecConfig,
                "FEARec: frequency-ramp hybrid (auto-correlation + time) attention, same-target contrast (ID only)")
class FEARec(SequentialRecommender):
    supports_trimming = False  # the FFT branches see every column, padding included

    def __init__(self, config: FEARecConfig, n_items: int, max_seq_length: int, loss_type: str = "ce"):
        super().__init__(config, n_items, max_seq_length, loss_type)
        c = config
        self.embedding = SequenceEmbedding(n_items, max_seq_length, c.hidden_size, c.hidden_dropout, c.layer_norm_eps)
        self.blocks = nn.ModuleList(FEARecBlock(c, max_seq_length, i) for i in range(c.num_layers))
        self.apply(lambda m: init_weights(m, c.initializer_range))
        self.sampler: SameTargetSampler | None = None

    def forward(self, input_ids: torch.Tensor, groups: int = 1,
                full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-out vectors (B, d) and, with `full`, the whole last-layer output (B, N, d) in the
        model's internal layout. Without `full` the last block runs at the read-out position only.
        `groups` > 1 marks the batch as that many stacked views (batch-mean lags per view)."""
        ids = full_width(input_ids, self.max_seq_length)
        b, n = ids.shape
        if self.config.padding == "right":
            ids, lengths = right_pad(ids)
            rows = (lengths - 1).clamp(min=0)
        else:
            rows = torch.full((b,), n - 1, dtype=torch.long, device=ids.device)
        x = self.embedding(ids)
        mask = attention_mask(ids, causal=True)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last and not full:
                return block(x, mask, groups, rows)[:, 0], None
            x = block(x, mask, groups)
        return x.gather(1, rows.view(b, 1, 1).expand(b, 1, x.shape[-1]))[:, 0], x

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        return self(batch.input_ids)[0]

    def item_vectors(self) -> torch.Tensor:
        return self.embedding.item.weight

    def prepare(self, train: SampleSet) -> None:
        device = self.embedding.item.weight.device
        self.sampler = SameTargetSampler(train, self.n_items).to(device)

    def same_target_inputs(self, batch: Batch) -> torch.Tensor:
        """(B, N) same-target positives drawn from the training set kept by `prepare`; without
        `prepare` (e.g. a model driven directly on batches) they are drawn from the batch itself."""
        sampler = self.sampler
        if sampler is None:
            own = SampleSet(batch.input_ids, batch.timestamps, batch.target, batch.user, batch.target_time)
            sampler = SameTargetSampler(own, self.n_items)
        elif sampler.order.device != batch.input_ids.device:
            sampler.to(batch.input_ids.device)
        return sampler.sample(batch.input_ids, batch.user, batch.target)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The ranking loss of the main view; in training, plus lmd_sem * InfoNCE(z_aug, z_sem) and the
        optional frequency regulariser, with (main, aug, sem) encoded as one stacked 3B batch."""
        c = self.config
        if not self.training or (c.lmd_sem <= 0 and c.freq_reg == "off"):
            query = self(batch.input_ids)[0]
            return ranking_loss(query, self.item_vectors(), batch.target, batch.neg, self.loss_type, c.ce_padding)
        sem = self.same_target_inputs(batch)
        m = self.max_seq_length
        ids = torch.cat([full_width(batch.input_ids, m)] * 2 + [full_width(sem, m)], 0)
        read, seq = self(ids, groups=3, full=c.freq_reg == "sequence")
        b = len(batch)
        query, z_aug, z_sem = read[:b], read[b:2 * b], read[2 * b:]
        main = ranking_loss(query, self.item_vectors(), batch.target, batch.neg, self.loss_type, c.ce_padding)
        extra = c.lmd_sem * info_nce(z_aug, z_sem, c.tau, c.sim) if c.lmd_sem > 0 else z_aug.new_zeros(())
        if c.freq_reg == "hidden":
            diff = torch.fft.rfft(z_aug, dim=-1, norm="ortho") - torch.fft.rfft(z_sem, dim=-1, norm="ortho")
            extra = extra + c.freq_reg_weight * diff.abs().mean()
        elif c.freq_reg == "sequence":
            diff = (torch.fft.rfft(seq[b:2 * b], dim=1, norm="ortho")
                    - torch.fft.rfft(seq[2 * b:], dim=1, norm="ortho"))
            extra = extra + c.freq_reg_weight * diff.abs().mean()
        return main + extra
