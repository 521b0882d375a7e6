"""BSARec (Shin et al., AAAI 2024): attentive inductive bias beyond self-attention.

Each block is ``BSARec layer -> FeedForward`` (specs/id-only-models.md). The layer mixes
- dsp = LN(X + Dropout(LPF(X) + beta (X - LPF(X)))): LPF keeps the rfft bins (over positions,
  padding included, as in the reference) below c//2 + 1, beta = sqrt_beta^2 per channel;
- gsp = masked (causal + padding) multi-head self-attention, LN(X + Dropout(Dense(attn)));
as alpha * dsp + (1 - alpha) * gsp.

Speed (same values as the straightforward computation; tests/test_bsarec_wearec.py checks it):
- the LPF is a fixed rank-r projection (r = 2 * kept bins - 1 or so), applied as U (U^T X) with
  an orthonormal (N, r) basis U of the kept real sinusoids instead of an rfft/irfft pair;
- the last block computes its output for the last position only (the read-out position): the
  LPF row N-1 needs only U[N-1] and U^T X, the attention only the last query
  (MultiHeadAttention(last_only=True)), and the FeedForward is position-wise;
- fast dropout from layers.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from athwe.dataset.split import Batch
from athwe.errors import ConfigError
from athwe.models.base import EncoderConfig, SequentialRecommender, register_model, stack_blocks
from athwe.models.layers import (Dropout, FeedForward, MultiHeadAttention, SequenceEmbedding, attention_mask, dropout,
                                 init_weights, ranking_loss)


@dataclass
class BSARecConfig(EncoderConfig):
    num_heads: int = 1  # the published settings (Beauty, LastFM) use 1 head; inner_size 256 = 4 * hidden as there
    alpha: float = 0.9
    c: int = 3  # keeps rfft bins 0 .. c//2


def low_pass_basis(n: int, c: int) -> torch.Tensor:
    """Orthonormal (n, r) basis U with U U^T X == irfft(rfft(X, ortho) with bins >= c//2+1 zeroed,
    n, ortho) along positions: the kept bins' real and imaginary sinusoids, normalised. float64."""
    keep = min(c // 2 + 1, n // 2 + 1)
    spec = torch.fft.rfft(torch.eye(n, dtype=torch.float64), dim=0, norm="ortho")  # (F, n)
    rows = [spec.real[f] for f in range(keep)]
    rows += [spec.imag[f] for f in range(1, keep) if 2 * f != n]  # DC / Nyquist imaginary parts are 0
    u = torch.stack(rows)
    return (u / u.norm(dim=1, keepdim=True)).t()


class FrequencyLayer(nn.Module):
    """dsp = LN(X + Dropout(LPF(X) + beta * (X - LPF(X)))), beta = sqrt_beta^2."""

    def __init__(self, hidden: int, seq_len: int, c: int, dropout: float, eps: float):
        super().__init__()
        self.seq_len = seq_len
        self.sqrt_beta = nn.Parameter(torch.randn(1, 1, hidden))
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        u = low_pass_basis(seq_len, c)
        self.register_buffer("basis", u.float(), persistent=False)  # (N, r)
        self.register_buffer("basis_t", u.t().contiguous().float(), persistent=False)  # (r, N)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        if x.shape[1] != self.seq_len:
            raise ValueError(f"bsarec: input has {x.shape[1]} positions, the filter is built for {self.seq_len}")
        coef = torch.matmul(self.basis_t, x)  # (B, r, d)
        if last_only:
            x = x[:, -1:]
            low = torch.matmul(self.basis[-1:], coef)  # (B, 1, d)
        else:
            low = torch.matmul(self.basis, coef)  # (B, N, d)
        beta = self.sqrt_beta * self.sqrt_beta
        return self.norm(x + self.dropout(torch.lerp(low.to(x.dtype), x, beta)))  # low + beta * (x - low)


class FoldedAttention(MultiHeadAttention):
    """MultiHeadAttention (same parameters, same function) with the projections re-associated:

    - last query only (any number of heads): score_n = q_h . (W_k,h x_n + b_k,h) = (q_h W_k,h) . x_n
      + q_h . b_k,h and sum_n a_n (W_v,h x_n + b_v,h) = W_v,h (sum_n a_n x_n) + (sum_n a_n) b_v,h,
      so no key or value vector is ever formed: O(N d) per row instead of O(N d^2);
    - all queries with one head: scores = (X W_q^T W_k + b_q W_k) X^T + q . b_k (the last term is
      constant along each row, an O(N d) product) and Dense(A V) = (A X) (W_d W_v)^T
      + rowsum(A) (W_d b_v)^T + b_d: two (d x d) products per layer instead of four.
    The attention-probability dropout acts on A exactly as before (hence rowsum(A), not 1)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        dh = d // h
        scale = dh ** -0.5
        training = self.training and self.attn_dropout > 0
        if last_only:
            q = self.query(x[:, -1]).view(b, h, 1, dh)
            qk = torch.matmul(q, self.key.weight.view(h, dh, d)).squeeze(2)  # (B, h, d)
            qb = torch.matmul(q, self.key.bias.view(h, dh, 1)).squeeze(3)  # (B, h, 1)
            scores = (qk @ x.transpose(1, 2) + qb) * scale
            att = torch.softmax(scores + mask[:, :, -1], dim=-1)  # (B, h, N)
            att = dropout(att, self.attn_dropout, training)
            ctx = torch.matmul((att @ x).unsqueeze(2), self.value.weight.view(h, dh, d).transpose(1, 2)).squeeze(2)
            ctx = ctx + att.sum(-1, keepdim=True) * self.value.bias.view(h, dh)  # (B, h, dh)
            out = self.dense(ctx.reshape(b, 1, d))
            return self.norm(x[:, -1:] + self.dropout(out))
        if h != 1:
            return super().forward(x, mask)
        wq, wk, wv, wd = self.query.weight, self.key.weight, self.value.weight, self.dense.weight
        bq, bk = self.query.bias, self.key.bias
        qa = F.linear(x, wk.t() @ wq, bq @ wk)  # x (W_q^T W_k) + b_q W_k
        # q . b_k, constant along each row: softmax ignores it, but kept (O(N d)) so that b_k gets the
        # same (rounding-level) gradient as in the unfolded attention
        q_bk = (x @ (wq.t() @ bk) + bq @ bk).unsqueeze(-1) * scale  # (B, N, 1)
        scores = torch.baddbmm(mask[:, 0] + q_bk, qa, x.transpose(1, 2), alpha=scale)  # + scale * qa x^T
        att = torch.softmax(scores, dim=-1)
        att = dropout(att, self.attn_dropout, training)
        out = F.linear(att @ x, wd @ wv, self.dense.bias) + att.sum(-1, keepdim=True) * (wd @ self.value.bias)
        return self.norm(x + self.dropout(out))


class BSARecBlock(nn.Module):
    def __init__(self, c: BSARecConfig, seq_len: int):
        super().__init__()
        self.alpha = c.alpha
        self.filter = FrequencyLayer(c.hidden_size, seq_len, c.c, c.hidden_dropout, c.layer_norm_eps)
        self.attention = FoldedAttention(c.hidden_size, c.num_heads, c.attn_dropout, c.hidden_dropout,
                                         c.layer_norm_eps)
        self.feed_forward = FeedForward(c.hidden_size, c.inner_size, c.hidden_dropout, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        dsp = self.filter(x, last_only)
        gsp = self.attention(x, mask, last_only)
        return self.feed_forward(torch.lerp(gsp, dsp, self.alpha))  # alpha * dsp + (1 - alpha) * gsp


@register_model("bsarec", BSARecConfig, "BSARec: low-pass inductive bias + causal self-attention (ID only)")
class BSARec(SequentialRecommender):
    """BSARec: low-pass inductive bias + causal self-attention (ID only)."""

    supports_trimming = False  # the low-pass filter sees the padding positions, as in the reference

    def __init__(self, config: BSARecConfig, n_items: int, max_seq_length: int, loss_type: str = "ce"):
        super().__init__(config, n_items, max_seq_length, loss_type)
        c = config
        if not 0.0 <= c.alpha <= 1.0:
            raise ConfigError(f"bsarec: alpha must be in [0, 1], got {c.alpha}")
        if c.c < 0:
            raise ConfigError(f"bsarec: c must be >= 0, got {c.c}")
        if c.hidden_size % c.num_heads:
            raise ConfigError(f"bsarec: hidden_size {c.hidden_size} is not a multiple of num_heads {c.num_heads}")
        self.embedding = SequenceEmbedding(n_items, max_seq_length, c.hidden_size, c.hidden_dropout, c.layer_norm_eps)
        self.blocks = stack_blocks(lambda: BSARecBlock(c, max_seq_length), c.num_layers, c.copy_first_block)
        self.apply(lambda m: init_weights(m, c.initializer_range))

    def forward(self, input_ids: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-out vectors (B, d) at the last position and, with `full`, the last block's whole
        output (B, N, d). Without `full` the last block computes the last position alone (same values)."""
        x = self.embedding(input_ids)
        mask = attention_mask(input_ids, causal=True)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, i == last and not full)
        return x[:, -1], (x if full else None)

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        return self(batch.input_ids)[0]

    def item_vectors(self) -> torch.Tensor:
        return self.embedding.item.weight

    def loss(self, batch: Batch) -> torch.Tensor:
        query = self(batch.input_ids)[0]
        return ranking_loss(query, self.item_vectors(), batch.target, batch.neg, self.loss_type,
                            self.config.ce_padding)
