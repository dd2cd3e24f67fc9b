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


def _encoder_args(args, kwargs):
    names = ("src", "mask", "src_key_padding_mask", "is_causal")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound.get("src"), bound.get("mask"), bound.get("src_key_padding_mask")


def _torch_would_nest(encoder, src, mask, padding) -> bool:
    """Whether torch's TransformerEncoder.forward would run this call on nested tensors (its
    inference fast path), whose padded rows come out as zeros. The conditions of torch's
    own forward, evaluated on the converted encoder's original setting."""
    if not getattr(encoder, "_seqkernels_use_nested_tensor", False) or padding is None or mask is not None:
        return False
    first = encoder.layers[0]
    if (not torch.backends.mha.get_fastpath_enabled() or first.training or src.dim() != 3 or src.is_nested
            or torch.is_autocast_enabled() or torch.compiler.is_compiling()):
        return False
    attn = first.self_attn
    params = (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, first.norm1.weight,
              first.norm1.bias, first.norm2.weight, first.norm2.bias, first.linear1.weight, first.linear1.bias,
              first.linear2.weight, first.linear2.bias)
    if torch.overrides.has_torch_function((src, *params)) or src.device.type not in ("cpu", "cuda"):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (src, *params)):
        return False
    if getattr(encoder, "mask_check", True):
        return bool(torch._nested_tensor_from_mask_left_aligned(src, padding.logical_not()))
    return True


def _zero_padded_rows(encoder, args, kwargs, output):
    """A forward hook on converted encoders: where torch would have taken its nested-tensor
    path, the padded rows are what that path gives (zeros, then the final norm, if any)."""
    src, mask, padding = _encoder_args(args, kwargs)
    if not isinstance(output, torch.Tensor) or not _torch_would_nest(encoder, src, mask, padding):
        return None
    pad = padding.bool() if padding.dtype == torch.bool else padding != 0
    if not encoder.layers[0].self_attn.batch_first:
        pad = pad.transpose(0, 1)
    fill = output.new_zeros(output.shape[-1])
    if encoder.norm is not None:
        fill = encoder.norm(fill[None])[0]
    return torch.where(pad[..., None], fill, output)


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
    input to nested tensors (``use_nested_tensor = False``). Outputs are torch's: where
    torch would have run the encoder on nested tensors (inference with a suffix
    ``src_key_padding_mask``), a forward hook gives the padded rows the values that path
    gives them (zeros, then the encoder's final norm); elsewhere they are computed, as in
    torch's training path.
    """
    for m in model.modules():
        new = _SWAPS.get(type(m))
        if new is not None:
            m.__class__ = new
            if new is attention.MultiheadAttention and _keep_module_path not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_keep_module_path)
        if isinstance(m, torch.nn.TransformerEncoder) and not hasattr(m, "_seqkernels_use_nested_tensor"):
            m._seqkernels_use_nested_tensor = m.use_nested_tensor
            m.use_nested_tensor = False
            m.register_forward_hook(_zero_padded_rows, with_kwargs=True)
    return model
