"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item sequence.

Embedding (items + positions) -> L Transformer blocks (causal + padding mask) -> the last
position's hidden state, scored against the item embedding table."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from athwe.dataset.split import Batch
from athwe.models.base import EncoderConfig, SequentialRecommender, register_model, stack_blocks
from athwe.models.layers import (SequenceEmbedding, Tokens, TransformerBlock, attention_mask, init_weights,
                                 ranking_loss)


@dataclass
class SASRecConfig(EncoderConfig):
    """SASRec has only the shared encoder settings."""


@register_model("sasrec", SASRecConfig, "SASRec: causal multi-head self-attention (ID only)")
class SASRec(SequentialRecommender):
    supports_trimming = True  # padding keys are masked out of attention

    def __init__(self, config: SASRecConfig, n_items: int, max_seq_length: int, loss_type: str = "ce"):
        super().__init__(config, n_items, max_seq_length, loss_type)
        c = config
        self.embedding = SequenceEmbedding(n_items, max_seq_length, c.hidden_size, c.hidden_dropout, c.layer_norm_eps)
        self.blocks = stack_blocks(
            lambda: TransformerBlock(c.hidden_size, c.num_heads, c.inner_size, c.attn_dropout, c.hidden_dropout,
                                     c.layer_norm_eps), c.num_layers, c.copy_first_block)
        self.apply(lambda m: init_weights(m, c.initializer_range))

    def forward(self, input_ids: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-out vectors (B, d) at the last position and, with `full`, the last block's whole
        output (B, N, d). Without `full` only the real items are computed (padding keys are masked
        and everything but attention is per position) and the last block only the last position."""
        x = self.embedding(input_ids)
        mask = attention_mask(input_ids, causal=True)
        last = len(self.blocks) - 1
        if full:
            for block in self.blocks:
                x = block(x, mask)
            return x[:, -1], x
        tokens = Tokens.of(input_ids)
        x = tokens.gather(x)
        for i, block in enumerate(self.blocks):
            x = block.forward_packed(x, tokens, mask, last=i == last)
        return x, None

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        return self(batch.input_ids)[0]

    def item_vectors(self) -> torch.Tensor:
        return self.embedding.item.weight

    def loss(self, batch: Batch) -> torch.Tensor:
        query = self(batch.input_ids)[0]
        return ranking_loss(query, self.item_vectors(), batch.target, batch.neg, self.loss_type,
                            self.config.ce_padding)
