"""Progress on stderr for long steps: a per-layer bar during prefill, through forward hooks on the decoder layers.

The hooks only count layers; they are registered inside :func:`prefill_progress` and removed in
``finally``. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def decoder_layers(model: Any) -> list[Any] | None:
    """The decoder layers of a transformers causal LM (``model.get_decoder().layers``), or None."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else None


@contextmanager
def prefill_progress(model: Any, desc: str = "prefill", enabled: bool = True, position: int = 0) -> Iterator[Any]:
    """A tqdm bar on stderr advanced by each decoder layer that runs on more than one token (the prefill).

    Decode steps (one token per row) do not move it. A second prefill inside the block starts the bar
    again. Yields the bar (or None when disabled or the model's layers are not found).
    """
    layers = decoder_layers(model) if enabled else None
    if not layers:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=len(layers), desc=desc, unit="layer", file=sys.stderr, leave=False, position=position)

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if getattr(hidden, "ndim", 0) == 3 and hidden.shape[1] > 1:
            if bar.n >= len(layers):
                bar.reset()
            bar.update(1)

    handles = []
    try:
        for layer in layers:
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        yield bar
    finally:
        for h in handles:
            h.remove()
        bar.close()
