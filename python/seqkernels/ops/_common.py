"""Registration helpers shared by the op families."""

from __future__ import annotations

import torch


def forbid_double_backward(op: str) -> None:
    """Give the backward op ``op`` an autograd formula that raises at the second backward.

    Without one, a backward run with ``create_graph=True`` returns gradients that carry no
    graph (torch only warns "autograd kernel was not registered"), and a second backward
    through them silently gives zeros. With it, the second backward raises, as torch's own
    fused kernels do.
    """

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"derivative for {op} is not implemented: seqkernels' fused kernels have first "
                           "derivatives only (no double backward). For second derivatives, use the "
                           "plain-PyTorch math in seqkernels.reference.")

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def functorch_wrapped(*tensors) -> bool:
    """Whether any argument is a torch.func (functorch) wrapper: inside ``torch.func.grad``,
    ``vmap``, ``jacrev`` ... The custom ops have no functorch rules, so callers either run
    plain-PyTorch math there or raise an error that says torch.func is unsupported."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the query (and unwraps functorch itself)
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:
        if t is not None and isinstance(t, torch.Tensor) and wrapped(t):
            return True
    return False


def script_unsupported(fn, name: str):
    """Make ``torch.jit.script`` of ``fn`` (or of a module that calls it) raise a clear
    error instead of failing to compile its Python (TorchScript checks this attribute)."""
    setattr(fn, "__script_unsupported", f"{name} cannot be scripted: it calls torch custom ops from Python, "
            "which TorchScript cannot compile. Use torch.compile (fullgraph=True works) or torch.export.")
    return fn
