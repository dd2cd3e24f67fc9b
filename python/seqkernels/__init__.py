"""seqkernels: fused kernels for sequence models (tanh RNN, LSTM, flash attention).

Importing the package loads the compiled core ``seqkernels._C``, which registers the
``torch.ops.seqkernels.*`` operators, then the CPU kernels built for this CPU's instruction
set (``seqkernels._cpu_<capability>``, chosen in :mod:`seqkernels._cpu`), and the Python
registrations (fake kernels, autograd, device dispatch) in :mod:`seqkernels.ops`.
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (the extension needs torch's libraries loaded first)

from . import _C  # noqa: F401
from . import _cpu  # noqa: F401  (loads the CPU kernels of one ISA)
from . import nn, reference
from ._info import build_info
from .ops.attention import flash_attention
from .ops.decode import flash_attention_with_kvcache
from .ops.varlen import flash_attention_varlen
from .ops.sdpa import scaled_dot_product_attention
from .ops.rnn import lstm, lstm_cell, rnn, rnn_cell
from . import errors


__all__ = ["__version__", "build_info", "errors", "flash_attention", "flash_attention_varlen", "flash_attention_with_kvcache", "lstm", "lstm_cell", "nn", "reference", "rnn", "rnn_cell",
           "scaled_dot_product_attention"]
