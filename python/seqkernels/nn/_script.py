"""TorchScript: the drop-in modules cannot be scripted, and say so."""

from __future__ import annotations


class NotScriptable:
    """Mixin: ``torch.jit.script`` of the module (or of a model that contains it) raises a
    RuntimeError that points to ``torch.compile`` / ``torch.export``.

    The modules run their kernels through Python (argument checks, autograd registered with
    ``torch.library``), which TorchScript cannot compile; ``torch.compile`` (also with
    ``fullgraph=True``) and ``torch.export`` trace the same custom ops and are supported.
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script does not support seqkernels.nn.{type(self).__name__}: its kernels are torch "
            "custom ops called from Python, which TorchScript cannot compile. Use torch.compile (fullgraph=True "
            "works) or torch.export instead, or script the model before seqkernels.nn.convert.")
