"""``seqkernels.nn.convert``: swap a model's torch.nn recurrent and attention modules in place."""

from __future__ import annotations

import torch

from . import attention, rnn

_SWAPS = {**rnn._SWAPS, torch.nn.MultiheadAttention: attention.MultiheadAttention}


def _keep_module_path(module, args):
    """A forward pre-hook that does nothing. torch's TransformerEncoderLayer skips its fused
    inference fast path (torch._transformer_encoder_layer_fwd, which would bypass the
    attention module's forward) when any submodule has hooks, so this keeps the converted
    attention on seqkernels' kernels in eval mode too."""
    return None


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch.nn`` LSTM, LSTMCell, RNN, RNNCell and MultiheadAttention in ``model``
    run on seqkernels, in place. Returns ``model``.

    The modules keep their parameters (the same tensors, so an optimizer built before the
    call still updates them): only their class changes to the seqkernels one, which adds
    no state. Subclasses of the torch modules are left alone.

    So that a converted ``torch.nn.TransformerEncoder`` really runs the seqkernels attention
    in inference too, where torch would take a fused path that never calls the attention
    module, converted attention modules get a no-op forward pre-hook (torch's encoder layer
    steps off its fast path when hooks are present) and encoders stop converting their
    input to nested tensors (``use_nested_tensor = False``). Outputs are unchanged; padded
    rows are computed rather than skipped by torch's nested-tensor path.
    """
    for m in model.modules():
        new = _SWAPS.get(type(m))
        if new is not None:
            m.__class__ = new
            if new is attention.MultiheadAttention and _keep_module_path not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_keep_module_path)
        if isinstance(m, torch.nn.TransformerEncoder):
            m.use_nested_tensor = False
    return model
