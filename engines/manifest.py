"""The engine manifest: what a model file is, what it expects and what it returns.

A manifest sits beside its model as ``<stem>.manifest.json``. It is decoded strictly (unknown
fields are errors) and every later check names the field that disagrees.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from engines.errors import ManifestError, ModelMismatchError
from engines.features import SCALAR_FEATURES

CLASSES: tuple[str, str, str] = ("sell", "hold", "buy")
FORMAT_VERSION = 1

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class Normalisation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """z-score with clipping: ``clip((x - mean) / std, -clip, clip)``."""

    kind: Literal["zscore"]
    mean: float
    std: Positive
    clip: Positive = 5.0


class Feature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    norm: Normalisation


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    dtype: Literal["float32", "float16"]
    # The leading "B" is the dynamic batch dimension.
    shape: tuple[str | int, ...]


class OutputSpec(TensorSpec, frozen=True, forbid_unknown_fields=True):
    classes: tuple[str, ...] = CLASSES


class TensorRTBuild(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The plan built from ``model_file`` by ``tradingd model build-plan``."""

    version: str
    compute_capability: str
    version_compatible: bool
    plan_file: str
    plan_sha256: str
    hardware_compatible: bool = False
    precision: Literal["fp32", "fp16"] = "fp16"
    gpu: str = ""


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything the daemon needs to know about a model file before loading it."""

    format: int
    name: str
    version: str
    model_file: str
    sha256: str
    input: TensorSpec
    output: OutputSpec
    features: tuple[Feature, ...]
    batch_buckets: tuple[PositiveInt, ...]
    budget_us: PositiveInt = 5000
    tensorrt: TensorRTBuild | None = None
    model: dict[str, object] = {}
    training: dict[str, object] = {}

    @property
    def window(self) -> int:
        return int(self.input.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.input.shape[2])

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


def manifest_path_for(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.manifest.json``."""
    return model_path.with_name(model_path.stem + ".manifest.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(model_path: Path) -> Manifest:
    """Read and validate the manifest beside ``model_path``; check the model file's hash.

    ``model_path`` is the ONNX model or, for the TensorRT backend, the plan built from it
    (``*.plan``), whose hash is the manifest's ``tensorrt.plan_sha256``.
    """
    path = manifest_path_for(model_path)
    if not path.is_file():
        raise ManifestError(str(path), "(file)", f"no manifest beside model {model_path}")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except msgspec.ValidationError as exc:
        field, _, problem = _split_msgspec_error(str(exc))
        raise ManifestError(str(path), field, problem) from exc
    except msgspec.DecodeError as exc:
        raise ManifestError(str(path), "(file)", f"not valid JSON: {exc}") from exc
    _check_consistency(str(path), manifest)
    if not model_path.is_file():
        raise ManifestError(str(path), "model_file", f"model file {model_path} does not exist")
    actual = sha256_file(model_path)
    if model_path.suffix == ".plan":
        if manifest.tensorrt is None:
            raise ManifestError(str(path), "tensorrt", "no TensorRT build recorded for this plan")
        if actual != manifest.tensorrt.plan_sha256:
            raise ModelMismatchError(str(model_path), "tensorrt.plan_sha256", manifest.tensorrt.plan_sha256, actual)
    elif actual != manifest.sha256:
        raise ModelMismatchError(str(model_path), "sha256", manifest.sha256, actual)
    return manifest


def _split_msgspec_error(message: str) -> tuple[str, str, str]:
    # msgspec says "Expected `int`, got `str` - at `$.input.shape[1]`"
    problem, sep, where = message.rpartition(" - at `")
    if not sep:
        return "(root)", "", message
    return where.rstrip("`").removeprefix("$.").removeprefix("$") or "(root)", "", problem


def _check_consistency(path: str, m: Manifest) -> None:
    if m.format != FORMAT_VERSION:
        raise ManifestError(path, "format", f"unsupported format {m.format}, expected {FORMAT_VERSION}")
    if len(m.input.shape) != 3 or m.input.shape[0] != "B":
        raise ManifestError(path, "input.shape", f"expected ['B', W, F], got {list(m.input.shape)}")
    if not all(isinstance(d, int) and d > 0 for d in m.input.shape[1:]):
        raise ManifestError(path, "input.shape", f"W and F must be positive ints: {m.input.shape}")
    if tuple(m.output.shape) != ("B", len(CLASSES)):
        raise ManifestError(path, "output.shape", f"expected ['B', 3], got {list(m.output.shape)}")
    if tuple(m.output.classes) != CLASSES:
        raise ManifestError(path, "output.classes", f"expected {list(CLASSES)}, got {m.output.classes}")
    if len(m.features) != m.input.shape[2]:
        raise ManifestError(
            path,
            "features",
            f"{len(m.features)} features listed but input.shape F = {m.input.shape[2]}",
        )
    for i, feature in enumerate(m.features):
        if feature.name not in SCALAR_FEATURES:
            raise ManifestError(
                path,
                f"features[{i}].name",
                f"unknown feature {feature.name!r}; known: {sorted(SCALAR_FEATURES)}",
            )
    if not m.batch_buckets or list(m.batch_buckets) != sorted(set(m.batch_buckets)):
        raise ManifestError(path, "batch_buckets", f"must be non-empty and strictly increasing: {m.batch_buckets}")


def encode_manifest(manifest: Manifest) -> bytes:
    """Pretty JSON, stable key order, for writing beside a model."""
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n"
