"""Errors raised by engines. Each carries the data that explains it."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every engine failure."""


class ManifestError(EngineError):
    """A manifest file is missing, unreadable or malformed."""

    def __init__(self, path: str, field: str, problem: str) -> None:
        self.path = path
        self.field = field
        self.problem = problem
        super().__init__(f"{path}: {field}: {problem}")


class ModelMismatchError(EngineError):
    """A model file disagrees with its manifest or with the daemon's configuration."""

    def __init__(self, model: str, field: str, expected: object, actual: object) -> None:
        self.model = model
        self.field = field
        self.expected = expected
        self.actual = actual
        super().__init__(f"{model}: {field} mismatch: manifest/config says {expected!r}, got {actual!r}")


class BackendUnavailableError(EngineError):
    """The backend's runtime library is not installed or cannot run here."""


class InferenceError(EngineError):
    """A single inference call failed."""


class PlanError(EngineError):
    """A TensorRT plan cannot run here: built for another TensorRT or GPU, or not loadable."""
