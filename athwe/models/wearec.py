"""WEARec (AAAI 2026): wavelet-enhanced adaptive frequency filter in place of self-attention.

Each block is ``WEARec layer -> FeedForward`` with no attention mask (specs/id-only-models.md).
The WEARec layer, per head h of k (channels split into k groups of d/k):

- dynamic frequency filter: Z = rfft(X, over positions, ortho); a 2-layer MLP of the mean of the
  block input over all N positions (padding included) gives per-(head, bin) deltas ds, db;
  Z' = Z * W_base (1 + ds) + (b_base + db) (a real gain and a real bias shared over the head's
  channels); X_fft = irfft(Z', n=N, ortho);
- wavelet enhancement: one level of Haar over position pairs (2m, 2m+1), detail coefficients
  scaled by a learnable T (1, k, N/2, d/k), then reconstructed;
- M = (1 - alpha) Y_wavelet + alpha X_fft; output LN(X + Dropout(M)).

Speed (same values as the straightforward computation; tests/test_bsarec_wearec.py checks it):
- the loss and the scores read the last position only, and everything after the last block's
  mixer is position-wise, so the last block computes its output for the last position alone. The
  mixer there still sees every position (through the context mean and the spectrum): its last
  row is X_fft[N-1] = sum_n v[b, h, n] X[b, n, h] + c[b, h], with v = gain @ G and c = bias @ g
  from fixed (F, N) / (F,) matrices G, g derived from the real DFT, and the wavelet output at
  N-1 only needs positions N-2 and N-1;
- full blocks transform along the contiguous axis of a transposed view (one rfft/irfft per block
  for all heads), with a custom rfft backward (a half-size c2r instead of torch's zero-padded c2c),
  and fold alpha and 1 - alpha into the small gain/bias/detail tensors;
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
from athwe.models.layers import Dropout, FeedForward, SequenceEmbedding, init_weights, ranking_loss


@dataclass
class WEARecConfig(EncoderConfig):
    """attn_dropout is accepted for parity with the reference command line; WEARec has no attention."""

    alpha: float = 0.3


def real_dft(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ortho rfft over n points as a real (n_rows, n) matrix D (rows: the real parts of bins
    0..n//2, then the imaginary parts of bins 1..(n-1)//2 -- the imaginary parts of the DC and
    Nyquist bins are identically zero and irfft ignores them); the bin of each row; and the
    (n, n_rows) matrix that maps those rows back through irfft(n, ortho). float64."""
    n_bins = n // 2 + 1
    n_imag = (n - 1) // 2
    spec = torch.fft.rfft(torch.eye(n, dtype=torch.float64), dim=0, norm="ortho")  # (F, n)
    fwd = torch.cat([spec.real, spec.imag[1:1 + n_imag]])
    bins = torch.cat([torch.arange(n_bins), torch.arange(1, 1 + n_imag)])
    unit = torch.zeros(n_bins + n_imag, n_bins, dtype=torch.complex128)
    rows = torch.arange(n_bins + n_imag)
    unit[rows[:n_bins], bins[:n_bins]] = 1.0
    unit[rows[n_bins:], bins[n_bins:]] = 1.0j
    inv = torch.fft.irfft(unit, n=n, dim=1, norm="ortho").t()  # column r = irfft of basis row r
    return fwd, bins, inv


class _RFFTOrtho(torch.autograd.Function):
    """rfft(x, n, dim=-1, norm="ortho") with a cheaper backward than torch's (which zero-pads the
    gradient to all n bins and runs a complex c2c transform): the adjoint of the ortho rfft is
    irfft(g * c, n, ortho) with c = 1 on the DC (and, for even n, Nyquist) bin and 1/2 elsewhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return torch.fft.rfft(x, n=n, dim=-1, norm="ortho")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n
        c = torch.full((n // 2 + 1,), 0.5, dtype=grad.real.dtype, device=grad.device)
        c[0] = 1.0
        if n % 2 == 0:
            c[-1] = 1.0
        return torch.fft.irfft(grad * c, n=n, dim=-1, norm="ortho"), None


def rfft_ortho(x: torch.Tensor, n: int) -> torch.Tensor:
    """torch.fft.rfft(x, n=n, dim=-1, norm="ortho") for a real x of length n on the last axis."""
    return _RFFTOrtho.apply(x, n)


class WEARecLayer(nn.Module):
    """Dynamic frequency filter + Haar wavelet branch, mixed by alpha; LN(X + Dropout(M))."""

    def __init__(self, hidden: int, heads: int, seq_len: int, alpha: float, dropout: float, eps: float):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"wearec: hidden_size {hidden} is not a multiple of num_heads {heads}")
        if seq_len % 2:
            raise ConfigError(f"wearec: max_seq_length must be even for the one-level Haar wavelet over "
                              f"position pairs, got {seq_len} (the reference code zero-fills the last, "
                              f"predicting position for an odd length)")
        self.heads, self.head_dim, self.seq_len = heads, hidden // heads, seq_len
        self.n_bins = seq_len // 2 + 1
        self.alpha = alpha
        self.filter_base = nn.Parameter(torch.ones(heads, self.n_bins, 1))  # W_base
        self.bias_base = nn.Parameter(torch.full((heads, self.n_bins, 1), -0.1))  # b_base
        self.adaptive_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                          nn.Linear(hidden, heads * self.n_bins * 2))
        self.detail_scale = nn.Parameter(torch.randn(1, heads, seq_len // 2, self.head_dim) * 0.02)  # T
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        # last-position read-out of the filter (see the module docstring), float32 buffers
        fwd, bins, inv = real_dft(seq_len)
        g = inv[seq_len - 1]  # (n_rows,) weight of each spectrum row in irfft(...)[N-1]
        onehot = F.one_hot(bins, self.n_bins).to(torch.float64)  # (n_rows, F)
        real_rows = (torch.arange(len(bins)) < self.n_bins).to(torch.float64)  # the bias is real
        self.register_buffer("last_gain", (onehot.t() @ (g.unsqueeze(1) * fwd)).float(), persistent=False)  # (F, N)
        self.register_buffer("last_bias", (onehot.t() @ (g * real_rows)).float(), persistent=False)  # (F,)

    def modulation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha * W and alpha * b, each (B, k, F), from the context mean of the block input."""
        b = x.shape[0]
        p = self.adaptive_mlp(x.mean(1)).view(b, self.heads, self.n_bins, 2)
        gain = self.filter_base.view(self.heads, self.n_bins) * (1.0 + p[..., 0])
        bias = self.bias_base.view(self.heads, self.n_bins) + p[..., 1]
        return gain * self.alpha, bias * self.alpha

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """M = (1-alpha) Y_wavelet + alpha X_fft for every position, (B, N, d)."""
        b, n, d = x.shape
        k, dh = self.heads, self.head_dim
        gain, bias = self.modulation(x)
        # spectral branch in the (B, d, N) view: rfft/irfft along its contiguous axis, all heads at once
        z = rfft_ortho(x.transpose(1, 2), n).view(b, k, dh, self.n_bins)
        z = z * gain.unsqueeze(2) + bias.unsqueeze(2)
        x_fft = torch.fft.irfft(z.view(b, d, self.n_bins), n=n, dim=-1, norm="ortho").transpose(1, 2)
        # wavelet branch on position pairs, (1 - alpha) and the Haar 1/2 folded into the coefficients
        s = 0.5 * (1.0 - self.alpha)
        t = self.detail_scale.permute(0, 2, 1, 3).reshape(n // 2, d) * s
        pairs = x.view(b, n // 2, 2, d)
        even, odd = pairs[:, :, 0], pairs[:, :, 1]
        approx = (even + odd) * s
        detail = (even - odd) * t
        y = torch.stack((approx + detail, approx - detail), dim=2).view(b, n, d)
        return y + x_fft

    def mix_last(self, x: torch.Tensor) -> torch.Tensor:
        """Row N-1 of `mix(x)`, (B, 1, d), without computing the other rows."""
        b, n, d = x.shape
        k, dh = self.heads, self.head_dim
        gain, bias = self.modulation(x)
        v = gain @ self.last_gain  # (B, k, N): irfft(Z*W)[N-1] = sum_n v[n] x[n] per head
        x_fft = torch.matmul(v.unsqueeze(2), x.view(b, n, k, dh).transpose(1, 2)).squeeze(2)  # (B, k, d/k)
        x_fft = x_fft + (bias @ self.last_bias).unsqueeze(-1)
        s = 0.5 * (1.0 - self.alpha)
        t = self.detail_scale[0, :, -1].reshape(d) * s
        even, odd = x[:, n - 2], x[:, n - 1]
        y = (even + odd) * s - (even - odd) * t
        return (y + x_fft.view(b, d)).unsqueeze(1)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        if x.shape[1] != self.seq_len:
            raise ValueError(f"wearec: input has {x.shape[1]} positions, the filter is built for {self.seq_len}")
        if last_only:
            return self.norm(x[:, -1:] + self.dropout(self.mix_last(x)))
        return self.norm(x + self.dropout(self.mix(x)))


class WEARecBlock(nn.Module):
    def __init__(self, c: WEARecConfig, seq_len: int):
        super().__init__()
        self.layer = WEARecLayer(c.hidden_size, c.num_heads, seq_len, c.alpha, c.hidden_dropout, c.layer_norm_eps)
        self.feed_forward = FeedForward(c.hidden_size, c.inner_size, c.hidden_dropout, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return self.feed_forward(self.layer(x, last_only))


@register_model("wearec", WEARecConfig, "WEARec: wavelet-enhanced adaptive frequency filter (ID only)")
class WEARec(SequentialRecommender):
    """WEARec: wavelet-enhanced adaptive frequency filter (ID only)."""

    supports_trimming = False  # the filter spans all N positions, padding included (as in the reference)

    def __init__(self, config: WEARecConfig, n_items: int, max_seq_length: int, loss_type: str = "ce"):
        super().__init__(config, n_items, max_seq_length, loss_type)
        c = config
        if not 0.0 <= c.alpha <= 1.0:
            raise ConfigError(f"wearec: alpha must be in [0, 1], got {c.alpha}")
        self.embedding = SequenceEmbedding(n_items, max_seq_length, c.hidden_size, c.hidden_dropout, c.layer_norm_eps)
        self.blocks = stack_blocks(lambda: WEARecBlock(c, max_seq_length), c.num_layers, c.copy_first_block)
        self.apply(lambda m: init_weights(m, c.initializer_range))

    def forward(self, input_ids: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-out vectors (B, d) at the last position and, with `full`, the last block's whole
        output (B, N, d). No attention mask: the filters see every position, padding included.
        Without `full` the last block computes the last position alone (same values)."""
        x = self.embedding(input_ids)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, i == last and not full)
        return x[:, -1], (x if full else None)

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        return self(batch.input_ids)[0]

    def item_vectors(self) -> torch.Tensor:
        return self.embedding.item.weight

    def loss(self, batch: Batch) -> torch.Tensor:
        query = self(batch.input_ids)[0]
        return ranking_loss(query, self.item_vectors(), batch.target, batch.neg, self.loss_type,
                            self.config.ce_padding)
