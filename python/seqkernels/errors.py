"""The exceptions seqkernels raises for bad arguments.

Every check names the argument and runs before any kernel. The classes derive from the
Python type that describes the mistake (ValueError, TypeError) *and* from the type torch
raises for the same call (RuntimeError for tensor shape, size and dtype mismatches;
AssertionError from ``torch.nn.MultiheadAttention``'s checks), so code written against
torch, ``except RuntimeError`` included, catches ours too.
"""

from __future__ import annotations


class ArgumentError(ValueError, RuntimeError):
    """A bad shape, size or value."""


class ArgumentTypeError(TypeError, ValueError, RuntimeError):
    """A bad type or dtype (torch raises RuntimeError for most, ValueError for an RNN's)."""


class ModuleArgumentError(ArgumentError, AssertionError):
    """A bad argument to a drop-in module whose torch counterpart checks it with ``assert``."""


class ModuleArgumentTypeError(ArgumentTypeError, AssertionError):
    """A bad type or dtype for such a module."""
