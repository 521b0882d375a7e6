"""Windowed attention on packed tokens: the same values as attention over the whole padded grid."""
from __future__ import annotations

import itertools

import pytest
import torch

from athwe.models.layers import Tokens, TransformerBlock, attention_mask, window_plan


def brute_force_plan(spans: list[int], length: int, quantum: int, max_groups: int) -> float:
    """Least sum(rows * window^2) over every split of the sorted rows into at most max_groups runs."""
    def window(s):
        return min(length, -(-s // quantum) * quantum)

    best = float("inf")
    for g in range(1, max_groups + 1):
        for cuts in itertools.combinations(range(1, len(spans)), g - 1):
            bounds = [0, *cuts, len(spans)]
            work = sum((e - s) * window(spans[e - 1]) ** 2 for s, e in zip(bounds, bounds[1:]))
            best = min(best, work)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_window_plan_covers_every_row_with_the_least_work(seed):
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(5, 60, (1,), generator=g))
    spans = sorted(torch.randint(1, length + 1, (9,), generator=g).tolist())
    groups = window_plan(spans, length, quantum=8, max_groups=3)
    assert sum(rows for rows, _ in groups) == len(spans) and len(groups) <= 3
    start = 0
    for rows, window in groups:
        assert window >= max(spans[start:start + rows]) and (window % 8 == 0 or window == length)
        start += rows
    assert sum(rows * window ** 2 for rows, window in groups) == brute_force_plan(spans, length, 8, 3)


def left_padded(lengths: list[int], n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (len(lengths), n), generator=g)
    for i, length in enumerate(lengths):
        ids[i, :n - length] = 0
    return ids


@pytest.mark.parametrize("n", [7, 50])
def test_packed_block_equals_the_full_grid(n):
    """Every real position's output (and each row's last position, read out alone) equals the
    block run on the whole (batch, length) grid, and so do the gradients of the parameters."""
    torch.manual_seed(0)
    lengths = [0, 1, 2, 3, n // 2, n - 1, n, 5, 9 % n + 1, n]
    ids = left_padded(lengths, n)
    block = TransformerBlock(16, 2, 32, 0.0, 0.0, 1e-12)
    x = torch.randn(len(lengths), n, 16)
    mask = attention_mask(ids, causal=True)
    tokens = Tokens.of(ids)
    assert len(tokens.windows.groups) > 1 or n == 7
    real = (ids > 0).view(-1)
    real_rows = real[tokens.rows]  # the kept tokens that are real items

    full = block(x, mask)
    packed = block.forward_packed(tokens.gather(x), tokens, mask)
    torch.testing.assert_close(packed[real_rows], full.reshape(-1, 16)[real], rtol=1e-5, atol=1e-5)
    last = block.forward_packed(tokens.gather(x), tokens, mask, last=True)
    # row 0 has no items: every key is masked, so its value is a convention (see the next test)
    torch.testing.assert_close(last[1:], full[1:, -1], rtol=1e-5, atol=1e-5)

    g_full = torch.autograd.grad((full[1:, -1] ** 2).sum(), list(block.parameters()))
    g_packed = torch.autograd.grad((last[1:] ** 2).sum(), list(block.parameters()))
    for a, b in zip(g_full, g_packed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_row_without_items_does_not_depend_on_its_neighbours():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 32, 0.0, 0.0, 1e-12).eval()
    n = 20
    alone = left_padded([0], n)
    x = torch.randn(1, n, 16)
    reads = []
    for lengths in ([0], [0, 3], [0, n, 1, 17]):
        ids = torch.cat([alone, left_padded(lengths[1:], n, seed=len(lengths))]) if len(lengths) > 1 else alone
        xs = torch.cat([x, torch.randn(len(lengths) - 1, n, 16)])
        tokens = Tokens.of(ids)
        mask = attention_mask(ids, causal=True)
        reads.append(block.forward_packed(tokens.gather(xs), tokens, mask, last=True)[0])
    for r in reads[1:]:
        torch.testing.assert_close(r, reads[0])
