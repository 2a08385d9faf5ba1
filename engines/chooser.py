"""Choose and build an engine backend once, at start-up."""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine, EngineSpec
from engines.errors import BackendUnavailableError

BACKENDS = ("onnxruntime",)
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "qwen-signal-v1" / "model.onnx"


def resolve_model(model: str) -> Path:
    """``builtin`` (or ``builtin:NAME``) names a model shipped with tradingd; anything else is a path."""
    if model == "builtin":
        return DEFAULT_MODEL
    if model.startswith("builtin:"):
        return MODELS_DIR / model.removeprefix("builtin:") / "model.onnx"
    return Path(model)


def build_engine(spec: EngineSpec) -> Engine:
    """Build the spec's backend. Imports the backend module only when it is chosen."""
    match spec.backend:
        case "onnxruntime":
            from engines.onnxruntime import OnnxRuntimeEngine  # noqa: PLC0415

            return OnnxRuntimeEngine(spec)
        case other:
            raise BackendUnavailableError(f"unknown engine backend {other!r}; available: {list(BACKENDS)}")
