"""Reference implementations: the textbook math in plain PyTorch, exact in float64.

They depend on nothing else in seqkernels and are the oracle of every test.
"""

from .attention import causal_mask, flash_attention, kvcache_attention, scaled_dot_product_attention, varlen_attention
from .philox import dropout_keep_mask, philox4x32_10
from .rnn import lstm, lstm_cell, rnn, rnn_cell, weights_from_module
from .transformer import (
    multi_head_attention,
    positional_encoding,
    transformer_decoder_layer,
    transformer_encoder_layer,
)

__all__ = [
    "causal_mask",
    "dropout_keep_mask",
    "flash_attention",
    "kvcache_attention",
    "lstm",
    "lstm_cell",
    "multi_head_attention",
    "philox4x32_10",
    "positional_encoding",
    "rnn",
    "rnn_cell",
    "scaled_dot_product_attention",
    "transformer_decoder_layer",
    "transformer_encoder_layer",
    "varlen_attention",
    "weights_from_module",
]
