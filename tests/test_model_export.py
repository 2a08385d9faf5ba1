"""The Qwen signal model: the shipped ONNX is what its checkpoint exports to, and a real Qwen3
checkpoint loads and exports through the same path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.base import EngineSpec, run_batch
from engines.chooser import build_engine
from engines.features import DEFAULT_FEATURES
from engines.manifest import load_manifest, manifest_path_for

torch = pytest.importorskip("torch", reason="the export extra (torch) is not installed")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.export, pytest.mark.slow]


def _windows(n: int, window: int, features: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, window, features)).astype(np.float32)


def test_reexporting_the_shipped_checkpoint_reproduces_the_shipped_model(shipped_model: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "model", "export", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    fresh = tmp_path / "model.onnx"
    shipped_manifest = json.loads(manifest_path_for(shipped_model).read_text())
    fresh_manifest = json.loads(manifest_path_for(fresh).read_text())
    for key in ("input", "output", "features", "batch_buckets", "name", "version", "training"):
        assert fresh_manifest[key] == shipped_manifest[key], key

    shipped = build_engine(EngineSpec("shipped", "onnxruntime", shipped_model))
    reexported = build_engine(EngineSpec("fresh", "onnxruntime", fresh))
    m = shipped.manifest
    for n, seed in ((1, 0), (7, 1), (64, 2)):
        batch = _windows(n, m.window, m.n_features, seed)
        a, b = run_batch(shipped, batch), run_batch(reexported, batch)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert (a.argmax(1) == b.argmax(1)).all()


def test_shipped_onnx_matches_its_torch_checkpoint(shipped_model: Path) -> None:
    from engines.model.qwen_signal import load_checkpoint  # noqa: PLC0415

    model, meta = load_checkpoint(shipped_model.parent / "checkpoint")
    engine = build_engine(EngineSpec("shipped", "onnxruntime", shipped_model))
    batch = _windows(32, meta.window, meta.n_features, 3)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(run_batch(engine, batch), expected, rtol=1e-4, atol=1e-5)


def test_a_real_qwen3_checkpoint_loads_and_exports_through_the_same_path(tmp_path: Path) -> None:
    from engines.errors import EngineError  # noqa: PLC0415
    from engines.model.export import export_onnx  # noqa: PLC0415
    from engines.model.qwen_signal import FeatureNorm, SignalMeta, load_checkpoint  # noqa: PLC0415

    config = transformers.Qwen3Config(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
    )
    torch.manual_seed(11)
    causal_lm = transformers.Qwen3ForCausalLM(config)
    checkpoint = tmp_path / "qwen3"
    causal_lm.save_pretrained(checkpoint)

    meta = SignalMeta(
        "qwen3-finetune",
        "0.1.0",
        window=8,
        features=tuple(FeatureNorm(n, 0.0, 1.0) for n in DEFAULT_FEATURES),
    )
    with pytest.raises(EngineError, match="signal_head"):
        load_checkpoint(checkpoint, meta=meta)
    model, _ = load_checkpoint(checkpoint, meta=meta, init_head_seed=5)
    for name, tensor in causal_lm.model.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor, msg=f"backbone weight {name} not loaded")

    path = export_onnx(model, meta, tmp_path / "out", buckets=(1, 4))
    manifest = load_manifest(path)
    assert manifest.model["hidden_size"] == 48 and manifest.window == 8
    engine = build_engine(EngineSpec("qwen3", "onnxruntime", path))
    batch = _windows(3, 8, 6, 4)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(run_batch(engine, batch), expected, rtol=1e-4, atol=1e-5)
