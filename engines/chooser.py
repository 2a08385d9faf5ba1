"""Choose and build an engine backend once, at start-up."""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine, EngineSpec
from engines.errors import BackendUnavailableError

BACKENDS = ("onnxruntime", "tensorrt", "timing")
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "qwen-signal-v1" / "model.onnx"


def resolve_model(model: str, backend: str = "onnxruntime") -> Path:
    """``builtin`` (or ``builtin:NAME``) names a model shipped with tradingd; anything else is a path.

    For the tensorrt backend a builtin model means its plan, ``model.plan``, which
    ``tradingd model build-plan`` writes beside the ONNX file on the GPU server.
    """
    filename = "model.plan" if backend == "tensorrt" else "model.onnx"
    if model == "builtin":
        return DEFAULT_MODEL.with_name(filename)
    if model.startswith("builtin:"):
        return MODELS_DIR / model.removeprefix("builtin:") / filename
    return Path(model)


def build_engine(spec: EngineSpec) -> Engine:
    """Build the spec's backend. Imports the backend module only when it is chosen."""
    match spec.backend:
        case "onnxruntime":
            from engines.onnxruntime import OnnxRuntimeEngine  # noqa: PLC0415

            return OnnxRuntimeEngine(spec)
        case "tensorrt":
            from engines.tensorrt import TensorRTEngine  # noqa: PLC0415

            return TensorRTEngine(spec)
        case "timing":
            from engines.timing import TimingEngine  # noqa: PLC0415

            return TimingEngine(spec)
        case other:
            raise BackendUnavailableError(f"unknown engine backend {other!r}; available: {list(BACKENDS)}")
