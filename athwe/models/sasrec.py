"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item sequence."""
from __future__ import annotations

from dataclasses import dataclass

from athwe.models.base import EncoderConfig, StackedEncoder, register_model, stack_blocks
from athwe.models.layers import SequenceEmbedding, TransformerBlock, init_weights


@dataclass
class SASRecConfig(EncoderConfig):
    """SASRec has only the shared encoder settings."""


@register_model("sasrec", SASRecConfig, "SASRec: causal multi-head self-attention (ID only)")
class SASRec(StackedEncoder):
    supports_trimming = True  # padding keys are masked out of attention
    def __init__(self, config: SASRecConfig, n_items: int, max_seq_length: int, loss_type: str = "ce"):
        super().__init__(config, n_items, max_seq_length, loss_type)
        c = config
        self.embedding = SequenceEmbedding(n_items, max_seq_length, c.hidden_size, c.hidden_dropout, c.layer_norm_eps)
        self.blocks = stack_blocks(
            lambda: TransformerBlock(c.hidden_size, c.num_heads, c.inner_size, c.attn_dropout, c.hidden_dropout,
                                     c.layer_norm_eps), c.num_layers, c.copy_first_block)
        self.apply(lambda m: init_weights(m, c.initializer_range))
