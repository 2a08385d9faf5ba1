"""LoRA fine-tuning: a Qwen3 checkpoint learns through its adapters, the merged export equals the
adapted model, the adapter stands on its own, and a base that cannot be fine-tuned is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from daemon.cli import main
from daemon.errors import EX_CONFIG
from daemon.feed.synth import SynthParams, generate, write_csv
from engines.base import EngineSpec, run_batch
from engines.chooser import DEFAULT_MODEL, build_engine
from engines.manifest import load_manifest

torch = pytest.importorskip("torch", reason="the export extra (torch) is not installed")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from engines.model.export import export_onnx  # noqa: E402
from engines.model.finetune import (  # noqa: E402
    FinetuneError,
    FinetuneReport,
    finetune,
    load_adapter,
    load_base,
)
from engines.model.qwen_signal import (  # noqa: E402
    HEAD_FILE,
    META_FILE,
    QwenSignalModel,
    SignalMeta,
    new_model,
    save_checkpoint,
    small_config,
)

pytestmark = [pytest.mark.export, pytest.mark.slow]

WINDOW = 8


def _qwen3_config(hidden: int = 32, max_positions: int = 64) -> object:
    return transformers.Qwen3Config(
        vocab_size=8,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_positions,
    )


def _save_qwen3(path: Path, *, hidden: int = 32, max_positions: int = 64) -> Path:
    torch.manual_seed(3)
    transformers.Qwen3ForCausalLM(_qwen3_config(hidden, max_positions)).save_pretrained(path)
    return path


def _momentum_series(symbols: int, bars: int, seed: int) -> list[npt.NDArray[np.float64]]:
    """Bars whose next move follows the last one (AR(1), phi 0.7): learnable from the last return."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(symbols):
        r = np.zeros(bars)
        noise = rng.standard_normal(bars) * 1e-3
        for t in range(1, bars):
            r[t] = 0.7 * r[t - 1] + noise[t]
        close = 100 * np.exp(np.cumsum(r))
        open_ = np.concatenate([[100.0], close[:-1]])
        wick = np.abs(rng.standard_normal(bars)) * 2e-4 * close
        high, low = np.maximum(open_, close) + wick, np.minimum(open_, close) - wick
        volume = rng.integers(1_000, 5_000, bars).astype(np.float64)
        out.append(np.column_stack([open_, high, low, close, volume]))
    return out


@dataclass(frozen=True)
class Tuned:
    base: Path
    out: Path
    model: QwenSignalModel
    meta: SignalMeta
    report: FinetuneReport


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    root = tmp_path_factory.mktemp("finetune")
    base = _save_qwen3(root / "qwen3")
    out = root / "out"
    model, meta, report = finetune(
        base,
        _momentum_series(4, 1200, seed=1),
        out,
        window=WINDOW,
        steps=80,
        lr=3e-3,
        seed=5,
        threads=1,
        eval_every=20,
        data="AR(1) momentum bars",
    )
    return Tuned(base, out, model, meta, report)


def _windows(n: int, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((n, WINDOW, 6)).astype(np.float32)


def test_finetune_when_the_next_move_follows_the_last_validation_loss_falls(tuned: Tuned) -> None:
    report = tuned.report
    assert report.last_val_loss < report.first_val_loss - 0.05, report.val_loss
    assert report.holdout_direction_accuracy > 0.6
    assert 0 < report.trainable_parameters < report.total_parameters
    assert (tuned.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tuned.meta.training["lora"]["rank"] == 8 and tuned.meta.training["base"] == str(tuned.base)


def test_merged_export_when_run_by_the_onnx_engine_equals_the_adapted_model(tuned: Tuned) -> None:
    fresh, _, _ = load_base(tuned.base, window=WINDOW, seed=99)
    adapted = load_adapter(fresh, tuned.out / "adapter")
    path = export_onnx(tuned.model, tuned.meta, tuned.out / "onnx", buckets=(1, 8, 32))
    engine = build_engine(EngineSpec("tuned", "onnxruntime", path))
    assert engine.manifest.window == WINDOW
    batch = _windows(29, 4)
    with torch.no_grad():
        expected = adapted(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(run_batch(engine, batch), expected, rtol=1e-4, atol=1e-4)


def test_adapter_when_loaded_on_a_fresh_base_reproduces_the_merged_model(tuned: Tuned) -> None:
    """A base with another head seed: the adapter carries the trained projection and head itself."""
    files = {p.name for p in (tuned.out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    fresh, _, _ = load_base(tuned.base, window=WINDOW, seed=123)
    batch = torch.from_numpy(_windows(16, 5))
    with torch.no_grad():
        untuned = fresh(batch)
        adapted = load_adapter(fresh, tuned.out / "adapter")(batch)
        merged = tuned.model(batch)
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(untuned, merged, atol=1e-3)


def test_finetune_when_the_checkpoint_is_gpt2_is_refused_naming_the_architecture(tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=8, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(FinetuneError, match=r"not a Qwen3 checkpoint: model_type 'gpt2'.*GPT2Model"):
        finetune(tmp_path / "gpt2", _momentum_series(1, 200, 0), tmp_path / "out", steps=1)


def test_finetune_when_the_checkpoint_is_missing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="no such checkpoint directory"):
        finetune(tmp_path / "absent", _momentum_series(1, 200, 0), tmp_path / "out", steps=1)


def test_finetune_when_the_window_exceeds_max_positions_is_refused(tmp_path: Path) -> None:
    base = _save_qwen3(tmp_path / "qwen3", max_positions=8)
    with pytest.raises(FinetuneError, match="window 16 is longer than the model's max_position_embeddings 8"):
        finetune(base, _momentum_series(1, 200, 0), tmp_path / "out", steps=1)


def test_finetune_when_the_head_does_not_fit_the_hidden_size_is_refused(tmp_path: Path) -> None:
    """A signal head saved for hidden 32 beside a hidden-48 backbone."""
    small = tmp_path / "small"
    meta = SignalMeta.from_json((DEFAULT_MODEL.parent / "checkpoint" / META_FILE).read_text())
    save_checkpoint(new_model(meta, small_config(window=meta.window), seed=1), meta, small)
    base = _save_qwen3(tmp_path / "wide", hidden=48)
    shutil.copy(small / HEAD_FILE, base / HEAD_FILE)
    shutil.copy(small / META_FILE, base / META_FILE)
    with pytest.raises(FinetuneError, match=r"proj.weight has shape \(32, 6\), but hidden_size 48"):
        finetune(base, _momentum_series(1, 200, 0), tmp_path / "out", steps=1)


def test_model_finetune_cli_when_the_base_is_not_qwen3_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = transformers.LlamaConfig(
        vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaModel(config).save_pretrained(tmp_path / "llama")
    data = tmp_path / "bars.csv"
    write_csv(generate(SynthParams(symbols=2, minutes=200, seed=1)), data)
    code = main(["model", "finetune", "--base", str(tmp_path / "llama"), "--data", str(data), "--out", str(tmp_path)])
    assert code == EX_CONFIG
    assert "model_type 'llama'" in capsys.readouterr().err


def test_model_finetune_cli_when_run_on_real_bars_exports_a_model_the_backtest_runs(
    minute_csv: Path, tmp_path: Path
) -> None:
    """The shipped signal checkpoint, LoRA-tuned on the real week before 2013-10-10, then backtested."""
    out = tmp_path / "tuned"
    tune = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "model",
            "finetune",
            "--base",
            str(DEFAULT_MODEL.parent / "checkpoint"),
            "--data",
            str(minute_csv),
            "--out",
            str(out),
            "--train-until",
            "2013-10-10",
            "--steps",
            "20",
            "--lora-rank",
            "4",
            "--buckets",
            "1",
            "8",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tune.returncode == 0, tune.stderr
    assert "val loss" in tune.stderr
    assert f"next: tradingd backtest --data {minute_csv} --model {out / 'model.onnx'} --from 2013-10-10" in tune.stdout
    for name in ("model.onnx", "model.manifest.json", "checkpoint/signal.json", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").is_file()
    assert load_manifest(out / "model.onnx").window == 16
    training = json.loads((out / "model.manifest.json").read_text())["training"]
    assert training["method"] == "lora" and training["lora"]["rank"] == 4
    assert training["train_until"] == "2013-10-10" and "us_equity_minute_2013-10.csv" in training["data"]

    backtest = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "backtest",
            "--data",
            str(minute_csv),
            "--model",
            str(out / "model.onnx"),
            "--from",
            "2013-10-10",
            "--no-qualify",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert backtest.returncode in (0, 1), backtest.stderr
    result = json.loads(backtest.stdout)
    assert result["gates"] and result["passed"] == (backtest.returncode == 0)

    demo = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--model", str(out / "model.onnx"), "--json", "--no-metrics"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr
    summary = json.loads(demo.stdout)
    assert summary["engine"]["name"] == json.loads((out / "model.manifest.json").read_text())["name"]
    assert summary["bars"]["balanced"] and summary["orders"]["balanced"]
