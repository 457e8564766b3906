"""Triton kernels for spectralkv (installed as ``spectralkv.kernels``).

Importing this package never imports Triton: the kernel modules do, and are imported only where a kernel runs.

* :mod:`.layout` (PyTorch): per-coordinate tables (bit width, byte, shift) and codebook tables of a quantizer.
* :mod:`.ref` (PyTorch): the references, also the CPU path: ``encode_ref``, ``decode_attention_ref``.
* :mod:`.cpu_attention` (PyTorch): the fused CPU path's decode attention, ``decode_attention_rows`` (the
  reference's numbers without re-laying the cache out per head).
* :mod:`.encode` (Triton): write path, ``spectral_encode`` (op ``spectralkv::encode_packed``).
* :mod:`.decode_attention` (Triton): fused split-K decode attention from packed codes, ``decode_attention``
  (op ``spectralkv::decode_attention_packed``).

* :mod:`.tracing`: registers the launchers as ``torch.library`` ops (``triton_op``; an opaque ``custom_op`` under
  the interpreter) so ``torch.compile`` traces them.

:mod:`spectralkv.fused` plugs them into transformers.
"""

import sys as _sys

if __name__ == "kernels":
    # Imported under the top-level name because a checkout's root is on sys.path (``python -m`` or ``-c`` run there,
    # a notebook started there): this folder would then shadow the Hugging Face ``kernels`` package, which
    # transformers >= 5.25 imports with ``import transformers``. Hand the name over to the installed one; with none
    # installed, stay an empty package without a version, which transformers reads as "not available".
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _rest = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
