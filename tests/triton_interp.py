"""Helpers for running Triton kernels through the CPU interpreter in test subprocesses."""

from __future__ import annotations

from typing import Any


def patch_interpreter_for_numpy() -> None:
    """Apply the upstream fix for triton-lang/triton#9171 when numpy >= 2.4.

    numpy 2.4 refuses ``int()`` of the interpreter's 1-element scalars, which breaks every
    kernel loop with a runtime bound in Triton 3.6's interpreter.
    """
    import numpy as np
    from triton.runtime import interpreter

    if tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
