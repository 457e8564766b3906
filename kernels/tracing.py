"""Registering the kernels' launchers as ``torch.library`` ops that ``torch.compile`` can trace, compiled or
interpreted.

Compiled Triton (a GPU): :func:`register_op` makes a ``triton_op``; ``wrap_triton`` turns each launch into a graph
node, and tracing decomposes the op into those nodes so inductor sees the kernels.

Under ``TRITON_INTERPRET=1`` ``wrap_triton`` hands back the interpreted kernel itself, which would run on the fake
tensors tracing uses ("Cannot access data pointer"), and a decomposed op would lose its launches. There the
launcher becomes an opaque ``custom_op`` whose fake implementation is the launcher itself with the launches left out
(:func:`skip_launch`: only the outputs' shapes matter while tracing), so a compiled graph calls the op, which runs
the interpreter on real tensors. This is what lets the CPU tests compile a decode step that uses the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.library import triton_op


def _interpreted(kernel: Any) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - Triton without its interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


def skip_launch(kernel: Any, *tensors: torch.Tensor | None) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) must not be launched on these tensors: it is interpreted and
    they are being traced (fake or functional tensors), so there is no data to run on."""
    if not _interpreted(kernel):
        return False
    from torch._subclasses.fake_tensor import is_fake

    return any(t is not None and is_fake(t) for t in tensors)


def register_op(name: str, launch: Callable[..., Any], kernel: Any) -> Any:
    """The op ``name`` (``"spectralkv::..."``) running ``launch``, whose first kernel is ``kernel``; an existing op of
    that name is returned as it is (a module imported twice)."""
    namespace, op_name = name.split("::")
    existing = getattr(getattr(torch.ops, namespace), op_name, None)
    if existing is not None:
        return existing
    if not _interpreted(kernel):
        return triton_op(name, mutates_args=())(launch)
    op = torch.library.custom_op(name, mutates_args=())(launch)
    op.register_fake(launch)
    return op
