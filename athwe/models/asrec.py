"""ASRec ("Adaptive Sequential Recommendation with Dynamic and Periodic Preferences Capturing").

E -> Fourier smoothing module (FSM) -> L hybrid layers -> read-out at the last item -> CE over all
items (specs/id-only-models.md, section ASRec). Reference code: WLHao0313/ASRec,
``recbole/model/sequential_recommender/asrec.py`` (FSM, model) and ``recbole/model/layers.py``
(``MultiHeadAttention`` = SAMM, ``MultiHeadAttention1`` = plain MHA, ``AHFF``,
``TransformerLayer``). Facts taken from the reference where the spec is terse:

* Layout. The reference runs in RecBole: sequences right-padded, position ids 0..N-1 from the
  first item, read-out gathered at length-1. Batches here are left-padded, so the model moves each
  row's items to the front (``right_pad``) and reads out at length-1: FSM's ``t`` counts from the
  first real item and position 0 is the first item, as in the reference.
* FSM. ``ES_t = sum_{m<=t} (1-a) a^(t-m) x_m`` with ``a = sigmoid(w)``; ``FSM_t = a^(t+1) v0 +
  v1 ES_t``; output ``A*FSM + (1-A)*x`` (``fsm_mix`` = A). The reference evaluates ES as an
  ortho-normalised FFT correlation of length L = next_fast_len(2N-1) (ETSformer's conv1d_fft with
  norm='ortho'), which returns ES_t / sqrt(L): ``es_scale="reference"`` (default) keeps that
  factor, ``"exact"`` drops it (only v1's effective scale differs). The causal convolution is
  computed as the equivalent lower-triangular Toeplitz product (same numbers as the zero-padded
  FFT convolution, and faster on CPU at the short lengths used here).
* Layer: ``out = v3 * MHA(X) + (1 - v3) * SAMM(X)`` (v3 learnable, init 0.5), then FeedForward.
  Both attentions use the padding-only (bidirectional) mask of the reference.
* SAMM: per-head attention -> GRU-like gate on [V, ctx] (reset/input gates, ``gelu(ctx + r*V)``)
  -> heads merged -> three Conv1d with kernels 3, 5, 7 whose *channels are the N positions* and
  which slide along the hidden axis (the reference's ``nn.Conv1d(max_seq_length, max_seq_length,
  k, padding=k//2)`` applied to (B, N, d)) -> each followed by ``AHFF(c) + c`` (one shared AHFF
  module) -> learnable per-position scales (1, N, 1) summed -> de-smoothing
  ``V = w_orig*x - w_neg*(S*x)``, ``S = softmax_d(xn*xn) + softmax_N(xn*xn)``, xn = x / ||x||_d
  -> GELU -> Dense -> Dropout -> LN(+input).
* AHFF: spectrum over positions; energy per bin summed over channels, divided by the per-sample
  (lower) median + 1e-6; keep the bins whose normalised energy is above the q-quantile (q init
  0.8; the reference declares it an nn.Parameter, but the hard comparison gives it no gradient,
  so it never moves from 0.8; here it is a saved buffer, which behaves identically);
  ``LN(x + Dropout(Re ifft(mask * fft(x))))`` with dropout 0.5. The reference takes the quantile
  over the whole batch (``torch.quantile`` of the flattened (B, N) energies), which makes a
  sample's prediction depend on the other samples in its batch, so evaluation would depend on
  the batch size; ``ahff_scope="sample"`` (default) takes it per sample, ``"batch"`` reproduces
  the reference. Computed with real DFT matrices (identical to the masked fft/ifft round trip).
* Initialisation: the reference SAMM's ``reset_parameters`` draws *every* parameter of the module
  from U(-1/sqrt(2 d_head), +1/sqrt(2 d_head)); RecBole's ``_init_weights`` then redraws Linear
  (N(0, 0.02), zero bias), Embedding and LayerNorm. So the conv kernels and biases, the gate, the
  per-position scales and the de-smoothing scalars (nominally 0.6 and 1.0) start uniform in that
  range; this is reproduced. v0, v1 ~ truncated N(0, 0.02); w ~ N(0, 1); v3 = 0.5; q = 0.8.

Padding: the design inherently mixes padded positions into real ones. The Conv1d over positions
(as channels) mixes every column into every column, AHFF's spectrum and the de-smoothing softmax
over N include the padded tail, and the conv weights and per-position scales are tied to N =
max_seq_length. So the prediction changes with the amount of padding (a history seen in an N=50
vs an N=60 window) and trimming is not supported; only the FSM (causal, right-padded) is exactly
padding-independent at real positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from athwe.dataset.split import Batch
from athwe.errors import ConfigError
from athwe.models.base import EncoderConfig, SequentialRecommender, register_model, stack_blocks
from athwe.models.layers import (Dropout, FeedForward, MultiHeadAttention, SequenceEmbedding, attention_mask,
                                 dropout, full_width, init_weights, ranking_loss, right_pad)

KERNELS = (3, 5, 7)


@dataclass
class ASRecConfig(EncoderConfig):
    hidden_size: int = 256
    num_heads: int = 4
    fsm_mix: float = 1.0  # A: output A*FSM + (1-A)*x (ml-100k, Beauty, Sports 1.0; Yelp 0.0; ml-1m 0.4)
    es_scale: str = "reference"  # reference (ES / sqrt(next_fast_len(2N-1)), as the reference) | exact
    ahff_quantile: float = 0.8  # initial q of the adaptive high-frequency filter
    ahff_dropout: float = 0.5
    ahff_scope: str = "sample"  # sample (per-sample quantile) | batch (reference: one quantile per batch)
    v3_init: float = 0.5  # initial MHA weight of the hybrid layer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.es_scale not in ("reference", "exact"):
            raise ConfigError(f"asrec es_scale {self.es_scale!r} is not one of reference, exact")
        if self.ahff_scope not in ("sample", "batch"):
            raise ConfigError(f"asrec ahff_scope {self.ahff_scope!r} is not one of sample, batch")
        if not 0.0 <= self.ahff_quantile <= 1.0:
            raise ConfigError(f"asrec ahff_quantile must be in [0, 1], got {self.ahff_quantile}")


def next_fast_len(n: int) -> int:
    """Smallest 5-smooth integer >= n (scipy.fftpack.next_fast_len, used by the reference FSM)."""
    m = max(n, 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class FSM(nn.Module):
    """Fourier smoothing module on right-padded (B, N, d) inputs (t = 0 is the first item)."""

    def __init__(self, hidden: int, mix: float, es_scale: str):
        super().__init__()
        self.smoothing_weight = nn.Parameter(torch.randn(1))
        self.v0 = nn.Parameter(torch.empty(1, 1, hidden))
        self.v1 = nn.Parameter(torch.empty(1, 1, hidden))
        nn.init.trunc_normal_(self.v0, std=0.02)
        nn.init.trunc_normal_(self.v1, std=0.02)
        self.mix = mix
        self.es_scale = es_scale

    def scale(self, n: int) -> float:
        return next_fast_len(2 * n - 1) ** -0.5 if self.es_scale == "reference" else 1.0

    def smoothing_matrix(self, n: int) -> torch.Tensor:
        """(N, N) lower-triangular Toeplitz W[t, m] = (1 - a) a^(t - m) for m <= t: ES = W @ x."""
        a = torch.sigmoid(self.smoothing_weight)
        lag = torch.arange(n, device=a.device)
        diff = lag.view(n, 1) - lag.view(1, n)
        w = (1 - a) * a ** diff.clamp(min=0).to(a.dtype)
        return torch.where(diff >= 0, w, torch.zeros((), dtype=a.dtype, device=a.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        a = torch.sigmoid(self.smoothing_weight)
        es = torch.matmul(self.smoothing_matrix(n), x) * self.scale(n)
        level = a ** torch.arange(1, n + 1, device=x.device, dtype=x.dtype)  # a^(t+1)
        fsm = level.view(1, n, 1) * self.v0 + self.v1 * es
        return self.mix * fsm + (1 - self.mix) * x


def _dft_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D (2F, n) with D @ x = [Re rfft(x); Im rfft(x)] and G (n, 2F) with G @ [Re; Im] = irfft(., n)."""
    f = n // 2 + 1
    spec = torch.fft.rfft(torch.eye(n, dtype=torch.float64), dim=0)  # (F, n): column t = rfft(e_t)
    d = torch.cat([spec.real, spec.imag], 0)
    unit = torch.eye(f, dtype=torch.complex128)
    g = torch.cat([torch.fft.irfft(unit, n=n, dim=0), torch.fft.irfft(1j * unit, n=n, dim=0)], 1)
    return d.float(), g.float()


class AHFF(nn.Module):
    """Adaptive high-frequency filter: keep the dominant-energy bins over positions, LN residual."""

    def __init__(self, hidden: int, n: int, eps: float, quantile: float, p: float, scope: str):
        super().__init__()
        # the reference declares q an nn.Parameter, but the hard comparison below gives it no
        # gradient, so it stays at its initial value there; a (saved) buffer behaves identically
        self.register_buffer("quantile", torch.tensor(float(quantile)))
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(p)
        self.scope = scope
        d, g = _dft_matrices(n)
        self.register_buffer("dft", d, persistent=False)
        self.register_buffer("idft", g, persistent=False)
        # full-spectrum bin k (0..n-1) has the energy of rfft bin min(k, n-k)
        k = torch.arange(n)
        self.register_buffer("mirror", torch.minimum(k, n - k), persistent=False)

    def keep_mask(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, F) bool: rfft bins kept, from (B, 2F, d) stacked real/imag spectra."""
        f = spec.shape[1] // 2
        with torch.no_grad():
            energy = (spec[:, :f] ** 2 + spec[:, f:] ** 2).sum(-1)  # (B, F)
            full = energy.index_select(1, self.mirror)  # (B, N): |fft|^2 of every bin of the full spectrum
            norm = full / (full.median(dim=1, keepdim=True).values + 1e-6)
            q = self.quantile.detach().clamp(0.0, 1.0).to(norm.dtype)
            if self.scope == "sample":
                thr = torch.quantile(norm, q, dim=1, keepdim=True)
            else:
                thr = torch.quantile(norm.flatten(), q)
            keep_full = norm > thr
        return keep_full[:, :f]

    def filtered(self, x: torch.Tensor) -> torch.Tensor:
        """Re ifft(mask * fft(x)) over positions."""
        spec = torch.matmul(self.dft, x)  # (B, 2F, d)
        keep = self.keep_mask(spec).to(x.dtype)
        return torch.matmul(self.idft, spec * torch.cat([keep, keep], 1).unsqueeze(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.filtered(x)))


class SAMM(nn.Module):
    """The reference's multi-scale attention (``MultiHeadAttention`` in its layers.py)."""

    def __init__(self, c: ASRecConfig, n: int):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)
        self.attn_dropout = c.attn_dropout
        gate = 2 * (d // c.num_heads)
        self.w_gate = nn.Parameter(torch.empty(gate, gate))
        self.b_gate = nn.Parameter(torch.empty(gate))
        self.convs = nn.ModuleList(nn.Conv1d(n, n, k, padding=k // 2) for k in KERNELS)
        self.scales = nn.ParameterList(nn.Parameter(torch.empty(1, n, 1)) for _ in KERNELS)
        self.w_orig = nn.Parameter(torch.empty(()))  # reference `orgin_scale`
        self.w_neg = nn.Parameter(torch.empty(()))  # reference `contra_scale`
        self.ahff = AHFF(d, n, c.layer_norm_eps, c.ahff_quantile, c.ahff_dropout, c.ahff_scope)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's effective init of the non-Linear parameters: U(+-1/sqrt(2 d_head))."""
        bound = 1.0 / math.sqrt(self.w_gate.shape[0])
        params = [self.w_gate, self.b_gate, self.w_orig, self.w_neg, *self.scales]
        for conv in self.convs:
            params += [conv.weight, conv.bias]
        with torch.no_grad():
            for p in params:
                p.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, dh).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) * dh ** -0.5 + mask, dim=-1)
        if self.training and self.attn_dropout > 0:
            att = dropout(att, self.attn_dropout, True)
        ctx = att @ v  # (B, H, N, dh)
        reset, inp = torch.sigmoid(F.linear(torch.cat([v, ctx], -1), self.w_gate, self.b_gate)).chunk(2, -1)
        ctx = (1 - inp) * ctx + inp * F.gelu(ctx + reset * v)
        ctx = ctx.transpose(1, 2).reshape(b, n, d)
        mixed = 0
        for conv, scale in zip(self.convs, self.scales):
            y = conv(ctx)  # channels = positions, sliding along the hidden axis
            mixed = mixed + scale * (self.ahff(y) + y)
        xn = F.normalize(mixed, dim=2)
        sim = xn * xn
        s = torch.softmax(sim, dim=2) + torch.softmax(sim, dim=1)
        out = self.w_orig * mixed - self.w_neg * (s * mixed)
        res = x
        if rows is not None:
            idx = rows.view(b, 1, 1).expand(b, 1, d)
            out, res = out.gather(1, idx), x.gather(1, idx)
        return self.norm(res + self.dropout(self.dense(F.gelu(out))))


def _mha_rows(mha: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """layers.MultiHeadAttention at one query position per row, (B, 1, d); `mask` is (B, 1, 1, N)."""
    b, n, d = x.shape
    h, dh = mha.heads, d // mha.heads
    xq = x.gather(1, rows.view(b, 1, 1).expand(b, 1, d))
    q = mha.query(xq).view(b, 1, h, dh).transpose(1, 2)
    k = mha.key(x).view(b, n, h, dh).transpose(1, 2)
    v = mha.value(x).view(b, n, h, dh).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) * dh ** -0.5 + mask, dim=-1)
    if mha.training and mha.attn_dropout > 0:
        att = dropout(att, mha.attn_dropout, True)
    out = (att @ v).transpose(1, 2).reshape(b, 1, d)
    return mha.norm(xq + mha.dropout(mha.dense(out)))


class ASRecLayer(nn.Module):
    def __init__(self, c: ASRecConfig, n: int):
        super().__init__()
        self.attention = MultiHeadAttention(c.hidden_size, c.num_heads, c.attn_dropout, c.hidden_dropout,
                                            c.layer_norm_eps)
        self.samm = SAMM(c, n)
        self.v3 = nn.Parameter(torch.tensor(float(c.v3_init)))
        self.feed_forward = FeedForward(c.hidden_size, c.inner_size, c.hidden_dropout, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        att = self.attention(x, mask) if rows is None else _mha_rows(self.attention, x, mask, rows)
        return self.feed_forward(self.v3 * att + (1 - self.v3) * self.samm(x, mask, rows))


@register_model("asrec", ASRecConfig,
                "ASRec: Fourier smoothing + hybrid MHA / multi-scale adaptive-filter attention (ID only)")
class ASRec(SequentialRecommender):
    supports_trimming = False  # conv over positions, AHFF and de-smoothing see every column

    def __init__(self, config: ASRecConfig, n_items: int, max_seq_length: int, loss_type: str = "ce"):
        super().__init__(config, n_items, max_seq_length, loss_type)
        c = config
        self.embedding = SequenceEmbedding(n_items, max_seq_length, c.hidden_size, c.hidden_dropout, c.layer_norm_eps)
        self.fsm = FSM(c.hidden_size, c.fsm_mix, c.es_scale)
        self.layers = stack_blocks(lambda: ASRecLayer(c, max_seq_length), c.num_layers, c.copy_first_block)
        self.apply(lambda m: init_weights(m, c.initializer_range))  # Linear/Embedding/LayerNorm only

    def forward(self, input_ids: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-out vectors (B, d) and, with `full`, the last layer's (B, N, d) output (right-padded
        layout). Without `full` the last layer's MHA, dense and FeedForward run at the read-out only."""
        ids, lengths = right_pad(full_width(input_ids, self.max_seq_length))
        b = ids.shape[0]
        rows = (lengths - 1).clamp(min=0)
        x = self.fsm(self.embedding(ids))
        mask = attention_mask(ids, causal=False)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == last and not full:
                return layer(x, mask, rows)[:, 0], None
            x = layer(x, mask)
        return x.gather(1, rows.view(b, 1, 1).expand(b, 1, x.shape[-1]))[:, 0], x

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        return self(batch.input_ids)[0]

    def item_vectors(self) -> torch.Tensor:
        return self.embedding.item.weight

    def loss(self, batch: Batch) -> torch.Tensor:
        query = self(batch.input_ids)[0]
        return ranking_loss(query, self.item_vectors(), batch.target, batch.neg, self.loss_type,
                            self.config.ce_padding)
