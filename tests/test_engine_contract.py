"""The Engine contract, run against every backend this machine has, on the shipped model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.base import Engine, EngineSpec, run_batch
from engines.chooser import build_engine
from engines.errors import BackendUnavailableError, ManifestError, ModelMismatchError
from engines.manifest import CLASSES, load_manifest, manifest_path_for

BACKENDS = ["onnxruntime", "timing"]
# Backends that run the model file itself, and so check its inputs against the manifest; the
# timing backend runs no model (it sleeps measured GPU times), so only the manifest and hash apply.
MODEL_BACKENDS = ["onnxruntime"]


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, shipped_model: Path) -> Engine:
    built = build_engine(EngineSpec(name="primary", backend=request.param, model=shipped_model))
    built.warm_up()
    return built


def _copy_model(shipped_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model.onnx"
    shutil.copy(shipped_model, target)
    shutil.copy(manifest_path_for(shipped_model), manifest_path_for(target))
    return target


def _edit_manifest(model: Path, **changes: object) -> None:
    path = manifest_path_for(model)
    doc = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(doc))


def test_engine_exposes_manifest_shapes_and_buckets(engine: Engine) -> None:
    m = engine.manifest
    assert m.input.shape[0] == "B" and m.output.shape == ("B", 3)
    assert m.output.classes == CLASSES
    # Every manifest bucket is served; the timing backend adds the larger buckets its table measured.
    assert set(m.batch_buckets) <= set(engine.buckets) and list(engine.buckets) == sorted(set(engine.buckets))
    if engine.backend in MODEL_BACKENDS:
        assert engine.buckets == m.batch_buckets
    for bucket in engine.buckets:
        buf = engine.input_buffer(bucket)
        assert buf.shape == (bucket, m.window, m.n_features) and buf.dtype == np.float32
        assert buf.flags.c_contiguous


def test_infer_returns_finite_float32_logits_per_row(engine: Engine) -> None:
    rng = np.random.default_rng(0)
    for bucket in engine.buckets:
        engine.input_buffer(bucket)[:] = rng.standard_normal(engine.input_buffer(bucket).shape)
        logits = engine.infer(bucket)
        assert logits.shape == (bucket, 3) and logits.dtype == np.float32
        assert np.isfinite(logits).all()


def test_rows_are_independent_of_batch_size_and_padding(engine: Engine) -> None:
    rng = np.random.default_rng(1)
    m = engine.manifest
    batch = rng.standard_normal((5, m.window, m.n_features)).astype(np.float32)
    together = run_batch(engine, batch)
    alone = np.concatenate([run_batch(engine, batch[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_bucket_for_picks_the_smallest_bucket_that_fits(engine: Engine) -> None:
    assert engine.bucket_for(1) == engine.buckets[0]
    assert engine.bucket_for(engine.buckets[-1]) == engine.buckets[-1]
    assert engine.bucket_for(engine.buckets[1] - 1) == engine.buckets[1]
    with pytest.raises(ValueError, match="largest bucket"):
        engine.bucket_for(engine.buckets[-1] + 1)


def test_health_counts_inferences(engine: Engine) -> None:
    before = engine.health().inferences
    engine.infer(engine.buckets[0])
    assert engine.health().inferences == before + 1 and engine.health().ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_when_model_bytes_differ_from_manifest_hash_names_sha256(
    backend: str, shipped_model: Path, tmp_path: Path
) -> None:
    model = _copy_model(shipped_model, tmp_path)
    with model.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelMismatchError) as err:
        build_engine(EngineSpec("primary", backend, model))
    assert err.value.field == "sha256"


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_load_when_manifest_shape_disagrees_with_model_names_input_shape(
    backend: str, shipped_model: Path, tmp_path: Path
) -> None:
    model = _copy_model(shipped_model, tmp_path)
    manifest = load_manifest(model)
    window = manifest.window
    _edit_manifest(model, input__shape=["B", window + 1, manifest.n_features])
    with pytest.raises(ModelMismatchError) as err:
        build_engine(EngineSpec("primary", backend, model))
    assert err.value.field == "input.shape"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (
            {"features": [{"name": "sentiment", "norm": {"kind": "zscore", "mean": 0, "std": 1}}] * 6},
            "features[0].name",
        ),
        ({"input__shape": ["B", 16]}, "input.shape"),
        ({"output__classes": ["buy", "hold", "sell"]}, "output.classes"),
        ({"batch_buckets": [8, 1]}, "batch_buckets"),
        ({"colour": "blue"}, "(root)"),
        ({"input__dtype": "int8"}, "input.dtype"),
    ],
)
def test_load_when_manifest_is_malformed_names_the_field(
    shipped_model: Path, tmp_path: Path, changes: dict[str, object], field: str
) -> None:
    model = _copy_model(shipped_model, tmp_path)
    _edit_manifest(model, **changes)
    with pytest.raises(ManifestError) as err:
        load_manifest(model)
    assert err.value.field == field
    assert str(manifest_path_for(model)) in str(err.value)


def test_load_when_manifest_is_missing_says_so(shipped_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(shipped_model, model)
    with pytest.raises(ManifestError, match="no manifest"):
        build_engine(EngineSpec("primary", "onnxruntime", model))


def test_build_engine_when_backend_is_unknown_names_the_choices(shipped_model: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="onnxruntime"):
        build_engine(EngineSpec("primary", "tpu", shipped_model))
