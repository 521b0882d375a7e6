"""Blocks shared by the sequential models (post-LN Transformer pieces, embeddings, masks, padding
layouts) and the ranking loss every model's ``loss`` is built on."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from athwe.errors import ConfigError

MASK_VALUE = -10000.0  # additive mask value of the reference code bases (finite: fully padded rows stay defined)


def _random_int16(x: torch.Tensor) -> torch.Tensor:
    """Uniform int16 values shaped like `x`, four per 64-bit draw of the CPU generator."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)  # full 64 bits
    return bits.view(torch.int16)[:n].view(x.shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, faster than F.dropout on CPU (whose Bernoulli sampling is not
    vectorised). On CPU each element is dropped when a uniform 16-bit value falls below
    round(p * 2^16), i.e. with probability p to within 2^-17 (exactly for p = 0.5), and kept ones
    are scaled by the inverse of the exact keep probability, so the expectation is exactly x; one
    64-bit draw serves four elements, which makes the mask cheaper than rand_like. Other
    devices draw the mask with rand_like."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    if x.device.type == "cpu":
        drop = round(p * 65536)
        if 0 < drop < 65536:
            keep = _random_int16(x).ge(drop - 32768)
            return x * keep.to(x.dtype).mul_(65536 / (65536 - drop))
    mask = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))
    return x * mask


class Dropout(nn.Module):
    """nn.Dropout replacement built on `dropout` above."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of a (V, d) table at integer ids, ``table[ids]`` with a reproducible backward.

    The backward of advanced indexing accumulates repeated ids with a multi-threaded scatter on
    CPU, so with more than one thread the table's gradient depends on thread timing and two runs
    with the same seed drift apart. The embedding backward sums each row in a fixed order."""
    return F.embedding(ids, table)


def ranking_loss(query: torch.Tensor, items: torch.Tensor, target: torch.Tensor, neg: torch.Tensor | None,
                 loss_type: str, ce_padding: bool = False) -> torch.Tensor:
    """The main training loss of every model on (B, D) queries against the (n_items + 1, D) item
    vectors: "ce" is cross-entropy over all items (the padding column is left out unless
    `ce_padding`, as the reference code bases score it too); "bce" is -log sig(pos) - log(1 - sig(neg))
    with one sampled negative per row (`neg`)."""
    if loss_type == "ce":
        logits = query @ items.t()
        if not ce_padding:
            logits[:, 0] = float("-inf")  # padding is never a valid prediction
        return F.cross_entropy(logits, target)
    if loss_type != "bce":
        raise ValueError(f"unknown loss {loss_type!r} (one of ce, bce)")
    if neg is None:
        raise ValueError("BCE loss needs sampled negatives in batch.neg")
    pos_score = (query * lookup(items, target)).sum(-1)
    neg_score = (query * lookup(items, neg)).sum(-1)
    return (F.softplus(-pos_score) + F.softplus(neg_score)).mean()


def full_width(input_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Left-padded (B, N) ids brought to `length` columns: the last `length` kept, or zeros prepended."""
    n = input_ids.shape[1]
    if n > length:
        return input_ids[:, -length:]
    return F.pad(input_ids, (length - n, 0)) if n < length else input_ids


def right_pad(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, N) ids -> right-padded ids (first item at column 0) and lengths (B,)."""
    n = input_ids.shape[1]
    lengths = (input_ids > 0).sum(1)
    src = torch.arange(n, device=input_ids.device).unsqueeze(0) + (n - lengths).unsqueeze(1)
    out = input_ids.gather(1, src.clamp(max=n - 1))
    return out.masked_fill(src >= n, 0), lengths


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for Linear and Embedding weights, zero biases, unit LayerNorm (BSARec/RecBole init)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()


def attention_mask(input_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Additive (B, 1, N, N) mask: padding keys (id 0) and, if causal, future keys get MASK_VALUE."""
    n = input_ids.shape[1]
    allowed = (input_ids > 0).unsqueeze(1).unsqueeze(2)  # (B,1,1,N) keys
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril().view(1, 1, n, n)
    zero = torch.zeros((), device=input_ids.device)
    return torch.where(allowed, zero, torch.full((), MASK_VALUE, device=input_ids.device))


class FeedForward(nn.Module):
    """LN(x + Dropout(W2 GELU(W1 x)))."""

    def __init__(self, hidden: int, inner: int, dropout: float, eps: float):
        super().__init__()
        self.dense_1 = nn.Linear(hidden, inner)
        self.dense_2 = nn.Linear(inner, hidden)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense_2(F.gelu(self.dense_1(x)))))


def window_plan(spans: list[int], length: int, quantum: int = 8, max_groups: int = 4) -> list[tuple[int, int]]:
    """Groups of rows for windowed attention: `spans` sorted ascending (each row's columns from its
    first real item to the end) -> [(rows in group, window)], consecutive groups of the sorted rows,
    at most `max_groups`, each window a multiple of `quantum` (or `length`) covering its rows' spans,
    chosen to minimise the attention work sum(rows * window^2)."""
    ladder = sorted({min(length, -(-s // quantum) * quantum) for s in spans})
    counts = [0] * len(ladder)
    j = 0
    for s in spans:
        while min(length, -(-s // quantum) * quantum) != ladder[j]:
            j += 1
        counts[j] += 1
    # best[g][i]: least work covering the first i ladder steps with g groups, the last ending at step i - 1
    inf = float("inf")
    best = [[inf] * (len(ladder) + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (len(ladder) + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for i in range(1, len(ladder) + 1):
            rows = 0
            for k in range(i - 1, -1, -1):  # the group holds ladder steps k..i-1
                rows += counts[k]
                work = best[g - 1][k] + rows * ladder[i - 1] ** 2
                if work < best[g][i]:
                    best[g][i], cut[g][i] = work, k
    g = min(range(1, max_groups + 1), key=lambda g: (best[g][len(ladder)], g))
    groups, i = [], len(ladder)
    while i:
        k = cut[g][i]
        groups.append((sum(counts[k:i]), ladder[i - 1]))
        i, g = k, g - 1
    return groups[::-1]


@dataclass
class Windows:
    """Attention over the kept tokens in a few groups of rows, each group on the last `window`
    columns that hold its rows' items, instead of the whole (batch, length) grid: a left-padded row
    with s items needs only its last s columns (the others are padding keys the mask removes).

    `order` lists the batch rows group by group; `slots` picks, for each (row, column) of every
    group's window in that order, its token's index in the packed rows (R: a zero row for positions
    that hold no token); `back[r]` is token r's slot (S, a zero row, for a token outside every window:
    a padding position whose value nothing reads); `cells` are the slots' flat grid indices
    (row * length + column). A row without items (all its keys masked) has a
    window of its last position alone, so its output does not depend on its batch neighbours."""

    order: torch.Tensor
    groups: list[tuple[int, int]]
    cells: torch.Tensor
    slots: torch.Tensor
    back: torch.Tensor

    @staticmethod
    def of(tokens: "Tokens") -> "Windows":
        b, n, r = tokens.batch, tokens.length, len(tokens.rows)
        span, order = tokens.span.sort(stable=True)
        spans = span.tolist()
        empty = spans.count(0)  # rows without items: their last position attends to itself alone
        groups = ([(empty, 1)] if empty else []) + (window_plan(spans[empty:], n) if empty < b else [])
        device = tokens.rows.device
        packed = torch.full((b * n,), r, dtype=torch.long, device=device)
        packed[tokens.rows] = torch.arange(r, device=device)
        cells, start = [], 0
        for rows, window in groups:
            cols = torch.arange(n - window, n, device=device)
            cells.append((order[start:start + rows].unsqueeze(1) * n + cols).reshape(-1))
            start += rows
        cells = torch.cat(cells)
        slot = torch.full((b * n,), len(cells), dtype=torch.long, device=device)
        slot[cells] = torch.arange(len(cells), device=device)
        return Windows(order, groups, cells, packed[cells], slot[tokens.rows])


@dataclass
class Tokens:
    """The positions of a (batch, length) grid that a model computes: every real item and each row's
    last position. `rows` are flat indices (row * length + column), ascending; `last[i]` is the
    index into `rows` of row i's last position; `span[i]` is row i's number of columns from its
    first real item to the end (0 for a row without items)."""

    batch: int
    length: int
    rows: torch.Tensor
    last: torch.Tensor
    span: torch.Tensor
    _windows: Windows | None = None

    @staticmethod
    def of(input_ids: torch.Tensor, buckets: int = 32) -> "Tokens":
        """The real items of left-padded ids, plus padding positions up to the next multiple of
        1/`buckets` of the grid: a padding position computes values nothing reads, and a few
        recurring token counts let the allocator reuse its blocks (counts that change with every
        batch fragment the heap until the process holds several times the memory it needs)."""
        keep = input_ids > 0
        b, n = keep.shape
        span = (n - keep.int().argmax(1)).masked_fill(~keep.any(1), 0)
        keep[:, -1] = True
        flat = keep.view(-1)
        count, quantum = int(flat.sum()), max(1, b * n // buckets)
        extra = min(b * n, -(-count // quantum) * quantum) - count
        if extra:
            flat[(~flat).nonzero().squeeze(1)[:extra]] = True
        return Tokens(b, n, flat.nonzero().squeeze(1), keep.sum(1).cumsum(0) - 1, span)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> the kept positions' rows, (R, d)."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.rows)

    def repeat(self, times: int) -> "Tokens":
        """The tokens of `times` stacked copies of the batch (rows of copy j after those of copy j - 1),
        for packed inputs concatenated copy after copy."""
        r, cells = len(self.rows), self.batch * self.length
        return Tokens(self.batch * times, self.length, torch.cat([self.rows + j * cells for j in range(times)]),
                      torch.cat([self.last + j * r for j in range(times)]), self.span.repeat(times))

    @property
    def windows(self) -> Windows:
        """The attention windows of these tokens (computed once, shared by every layer)."""
        if self._windows is None:
            self._windows = Windows.of(self)
        return self._windows


class MultiHeadAttention(nn.Module):
    """LN(x + Dropout(Dense(softmax(QK^T/sqrt(dh) + mask) V)))."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float, hidden_dropout: float, eps: float):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not a multiple of num_heads {heads}")
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.attn_dropout = attn_dropout
        self.dropout = Dropout(hidden_dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def context(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """The attention output before the dense/residual step: (B, N, hidden), or (B, 1, hidden)
        for the last query position only when `last_only` (all that a last-position readout needs)."""
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        xq = x[:, -1:] if last_only else x
        if last_only:
            mask = mask[:, :, -1:]
        q, k, v = split(self.query(xq)), split(self.key(x)), split(self.value(x))
        if self.training and self.attn_dropout > 0:
            att = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5 + mask, dim=-1)
            out = dropout(att, self.attn_dropout, True) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, xq.shape[1], d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        res = x[:, -1:] if last_only else x
        return self.norm(res + self.dropout(self.dense(self.context(x, mask, last_only))))

    def forward_packed(self, x: torch.Tensor, tokens: Tokens, mask: torch.Tensor, last: bool = False) -> torch.Tensor:
        """The same function on the kept tokens only: x (R, d) holds the hidden states of the grid
        positions `tokens.rows`. Positions left out are padding, whose keys the mask removes, so
        they need no query, key, value or output; attention runs group by group on the columns that
        hold the group's items (`Tokens.windows`). With `last`, the output of each row's last
        position only, (B, d). Q, K and V come from one matrix product."""
        d = x.shape[1]
        h, dh = self.heads, d // self.heads
        win = tokens.windows
        names = ("key", "value") if last else ("query", "key", "value")
        mods = [getattr(self, name) for name in names]
        proj = F.linear(x, torch.cat([m.weight for m in mods]), torch.cat([m.bias for m in mods]))
        cells = F.pad(proj, (0, 0, 0, 1)).index_select(0, win.slots)  # every group's window, row-major
        mask = mask.index_select(0, win.order) if mask.shape[0] > 1 else mask
        if last:
            xq = x.index_select(0, tokens.last)
            q_all = self.query(xq.index_select(0, win.order))
        outs, start, row = [], 0, 0
        for rows, window in win.groups:
            parts = cells[start:start + rows * window].view(rows, window, len(mods), h, dh).permute(2, 0, 3, 1, 4)
            start += rows * window
            m = mask[row:row + rows] if mask.shape[0] > 1 else mask
            if last:
                q, (k, v) = q_all[row:row + rows].view(rows, h, 1, dh), parts
                m = m[:, :, -1:, -window:]
            else:
                (q, k, v), m = parts, m[:, :, -window:, -window:]
            row += rows
            if self.training and self.attn_dropout > 0:
                att = torch.softmax(q @ k.transpose(-1, -2) * dh ** -0.5 + m, dim=-1)
                out = dropout(att, self.attn_dropout, True) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            outs.append(out.transpose(1, 2).reshape(-1, d))
        if last:
            unsort = torch.empty_like(win.order)
            unsort[win.order] = torch.arange(len(win.order), device=unsort.device)
            return self.norm(xq + self.dropout(self.dense(torch.cat(outs).index_select(0, unsort))))
        out = torch.cat(outs + [x.new_zeros(1, d)]).index_select(0, win.back)
        return self.norm(x + self.dropout(self.dense(out)))


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, attn_dropout: float, hidden_dropout: float, eps: float):
        super().__init__()
        self.attention = MultiHeadAttention(hidden, heads, attn_dropout, hidden_dropout, eps)
        self.feed_forward = FeedForward(hidden, inner, hidden_dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return self.feed_forward(self.attention(x, mask, last_only))

    def forward_packed(self, x: torch.Tensor, tokens: Tokens, mask: torch.Tensor, last: bool = False) -> torch.Tensor:
        """`forward` on the kept tokens only (MultiHeadAttention.forward_packed)."""
        return self.feed_forward(self.attention.forward_packed(x, tokens, mask, last))


class SequenceEmbedding(nn.Module):
    """E = Dropout(LN(ItemEmb(x) + PosEmb(0..N-1)))."""

    def __init__(self, n_items: int, max_len: int, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.position = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # position ids are right-aligned to max_len, so an input with leading all-padding columns
        # removed gets the same positions as the full-width one
        n, max_len = input_ids.shape[1], self.position.num_embeddings
        pos = torch.arange(max_len - n, max_len, device=input_ids.device)
        return self.dropout(self.norm(self.item(input_ids) + self.position(pos).unsqueeze(0)))
