"""LoRA fine-tuning (peft) of a Qwen3 signal model on bars; the merged model exports as any other.

The base is either a signal checkpoint (``save_checkpoint``: backbone + projection, head and
``signal.json``) or a plain Qwen3 checkpoint as transformers' ``save_pretrained`` writes it
(``Qwen3Model`` or ``Qwen3ForCausalLM``). A plain one has no input projection or head: they are
new, sized by the features and the backbone's hidden size, seeded, and trained in full
(peft's ``modules_to_save``), while the decoder layers train through their LoRA adapters only.

Normalisation: a signal checkpoint keeps its own (its projection was trained on it); a plain
Qwen3 base gets the training windows' z-scores, as ``train`` computes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

from engines.errors import EngineError
from engines.features import DEFAULT_FEATURES, SCALAR_FEATURES
from engines.model.qwen_signal import (
    HEAD_FILE,
    META_FILE,
    FeatureNorm,
    QwenSignalModel,
    SignalMeta,
    load_checkpoint,
)
from engines.model.train import direction_accuracy, make_dataset

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Trained in full beside the adapters: the bar-feature projection and the signal head. peft
# matches these by suffix, and "proj" alone would also match q_proj etc.; hence the wrapper's
# "signal." prefix (see ``SignalLora``).
MODULES_TO_SAVE: tuple[str, ...] = ("signal.proj", "signal.head")
QWEN3_ARCHITECTURES = frozenset({"Qwen3Model", "Qwen3ForCausalLM"})
ADAPTER_DIR = "adapter"
LOSS_PNG = "loss.png"
HOLDOUT_FRACTION = 0.2
MAX_VAL_WINDOWS = 4096


class FinetuneError(EngineError):
    """The base checkpoint or its settings cannot be fine-tuned on these features: bad input."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class FinetuneReport:
    steps: int
    seconds: float
    base_kind: str  # "signal checkpoint" or "plain Qwen3"
    trainable_parameters: int
    total_parameters: int
    train_loss: tuple[tuple[int, float], ...]
    val_loss: tuple[tuple[int, float], ...]
    holdout_accuracy: float
    holdout_direction_accuracy: float
    holdout_samples: int
    adapter: Path
    loss_png: Path | None
    lora: dict[str, Any] = field(default_factory=dict)

    @property
    def first_val_loss(self) -> float:
        return self.val_loss[0][1]

    @property
    def last_val_loss(self) -> float:
        return self.val_loss[-1][1]


def read_base_config(base: Path) -> dict[str, Any]:
    """The base's ``config.json``, refused unless it is a Qwen3 checkpoint."""
    if not base.exists():
        raise FinetuneError(base, "no such checkpoint directory")
    config_file = base / "config.json"
    if not config_file.is_file():
        raise FinetuneError(base, "not a transformers checkpoint (no config.json)")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise FinetuneError(base, f"config.json is not JSON: {exc}") from exc
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "qwen3" or (architectures and not set(architectures) <= QWEN3_ARCHITECTURES):
        raise FinetuneError(
            base,
            f"not a Qwen3 checkpoint: model_type {model_type!r}, architectures {architectures!r}"
            f" (fine-tuning needs model_type 'qwen3' and one of {sorted(QWEN3_ARCHITECTURES)})",
        )
    if not any((base / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise FinetuneError(base, "no model.safetensors weights beside config.json")
    return config


def _check_shapes(base: Path, config: dict[str, Any], meta: SignalMeta, has_head: bool) -> None:
    hidden = int(config["hidden_size"])
    max_positions = int(config.get("max_position_embeddings", 0))
    if meta.window > max_positions:
        raise FinetuneError(
            base, f"window {meta.window} is longer than the model's max_position_embeddings {max_positions}"
        )
    unknown = [f.name for f in meta.features if f.name not in SCALAR_FEATURES]
    if unknown:
        raise FinetuneError(
            base, f"features {unknown} are not bar features this daemon computes ({sorted(SCALAR_FEATURES)})"
        )
    if not has_head:
        return
    expected = {
        "proj.weight": (hidden, meta.n_features),
        "proj.bias": (hidden,),
        "head.weight": (3, hidden),
        "head.bias": (3,),
    }
    with safe_open(str(base / HEAD_FILE), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    for key, want in expected.items():
        got = shapes.get(key)
        if got != want:
            raise FinetuneError(
                base,
                f"{HEAD_FILE} {key} has shape {got}, but hidden_size {hidden} and {meta.n_features} features"
                f" need {want}",
            )


def load_base(
    base: Path, *, window: int | None = None, features: tuple[str, ...] = DEFAULT_FEATURES, seed: int = 7
) -> tuple[QwenSignalModel, SignalMeta, bool]:
    """The base model, its meta, and whether its normalisation is its own (a signal checkpoint)."""
    config = read_base_config(base)
    has_head = (base / HEAD_FILE).is_file() and (base / META_FILE).is_file()
    if has_head:
        meta = SignalMeta.from_json((base / META_FILE).read_text())
        if window is not None and window != meta.window:
            meta = SignalMeta(meta.name, meta.version, window, meta.features, meta.training)
    else:
        # Placeholder norms; the caller computes them from the training windows.
        norms = tuple(FeatureNorm(n, 0.0, 1.0) for n in features)
        meta = SignalMeta("qwen3-lora", "1.0.0", 16 if window is None else window, norms)
    _check_shapes(base, config, meta, has_head)
    model, meta = load_checkpoint(base, meta=meta, init_head_seed=None if has_head else seed)
    return model, meta, has_head


class SignalLora(nn.Module):
    """What the adapter is trained on and saved against: the signal model under ``signal.``."""

    def __init__(self, signal: QwenSignalModel) -> None:
        super().__init__()
        self.signal = signal

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.signal(features)
        return logits


def wrap_lora(
    model: QwenSignalModel,
    *,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> PeftModel:
    """The model with LoRA adapters on the Qwen3 layers; projection and head trained in full."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or DEFAULT_TARGET_MODULES),
        modules_to_save=list(MODULES_TO_SAVE),
    )
    return get_peft_model(SignalLora(model), config)


def load_adapter(model: QwenSignalModel, adapter: Path) -> PeftModel:
    """A saved adapter (``out/adapter``) applied to a freshly loaded base model, for inference."""
    if not (adapter / "adapter_config.json").is_file():
        raise FinetuneError(adapter, "not a LoRA adapter directory (no adapter_config.json)")
    peft_model = PeftModel.from_pretrained(SignalLora(model), str(adapter))
    return peft_model.eval()


def _holdout_split(
    series: Sequence[npt.NDArray[np.float64]], window: int
) -> tuple[list[npt.NDArray[np.float64]], list[npt.NDArray[np.float64]]]:
    split = [int(len(s) * (1 - HOLDOUT_FRACTION)) for s in series]
    return [s[:k] for s, k in zip(series, split, strict=True)], [
        s[k - window :] for s, k in zip(series, split, strict=True)
    ]


def finetune(
    base: Path,
    series: Sequence[npt.NDArray[np.float64]],
    out: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    steps: int = 200,
    lr: float = 2e-3,
    seed: int = 7,
    batch_size: int = 128,
    window: int | None = None,
    name: str | None = None,
    version: str | None = None,
    eval_every: int = 25,
    progress: Callable[[int, float, float], None] | None = None,
    data: str = "",
    plot: bool = True,
    threads: int | None = None,
) -> tuple[QwenSignalModel, SignalMeta, FinetuneReport]:
    """LoRA-train ``base`` on per-symbol OHLCV arrays ([T, 5], time order; last 20 % held out).

    Writes the adapter alone to ``out/adapter`` and the loss curves to ``out/loss.png``; returns
    the merged plain model (ready for ``export_onnx``), its meta and a report. ``threads`` sets
    torch's intra-op threads for the run (restored after): on a shared two-core box more than one
    thread thrashes, ten times slower per step.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _finetune(
            base,
            series,
            out,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            steps=steps,
            lr=lr,
            seed=seed,
            batch_size=batch_size,
            window=window,
            name=name,
            version=version,
            eval_every=eval_every,
            progress=progress,
            data=data,
            plot=plot,
        )
    finally:
        torch.set_num_threads(previous)


def _finetune(
    base: Path,
    series: Sequence[npt.NDArray[np.float64]],
    out: Path,
    *,
    rank: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] | None,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int,
    window: int | None,
    name: str | None,
    version: str | None,
    eval_every: int,
    progress: Callable[[int, float, float], None] | None,
    data: str,
    plot: bool,
) -> tuple[QwenSignalModel, SignalMeta, FinetuneReport]:
    if rank < 1 or alpha < 1 or not 0.0 <= dropout < 1.0 or steps < 1:
        raise FinetuneError(base, f"bad LoRA settings: rank {rank}, alpha {alpha}, dropout {dropout}, steps {steps}")
    model, meta, own_norms = load_base(base, window=window, seed=seed)
    window = meta.window
    features = tuple(f.name for f in meta.features)
    short = [len(s) for s in series if len(s) * HOLDOUT_FRACTION <= window + 1]
    if not series or short:
        raise FinetuneError(
            base, f"need series long enough for a {window}-bar window in the 20 % holdout; lengths {short or 'none'}"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_series, hold_series = _holdout_split(series, window)
    all_returns = np.concatenate([np.diff(np.log(s[:, 3])) for s in train_series])
    hold_band = float(0.25 * all_returns.std())
    x, y, _ = make_dataset(train_series, features, window, hold_band)
    xh, yh, rh = make_dataset(hold_series, features, window, hold_band)
    if own_norms:
        norms = meta.features
    else:
        flat = x.reshape(-1, x.shape[-1])
        mu, sd = flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-6)
        norms = tuple(FeatureNorm(n, float(m), float(s)) for n, m, s in zip(features, mu, sd, strict=True))
    mean = np.asarray([f.mean for f in norms], dtype=np.float32)
    std = np.asarray([f.std for f in norms], dtype=np.float32)
    clip = np.asarray([f.clip for f in norms], dtype=np.float32)

    def normalise(a: npt.NDArray[np.float32]) -> torch.Tensor:
        return torch.from_numpy(np.clip((a - mean) / std, -clip, clip).astype(np.float32))

    xt, yt = normalise(x), torch.from_numpy(y)
    val_idx = np.linspace(0, len(xh) - 1, min(len(xh), MAX_VAL_WINDOWS)).astype(np.int64)
    xv, yv = normalise(xh[val_idx]), torch.from_numpy(yh[val_idx])
    counts = np.bincount(y, minlength=3).astype(np.float64)
    weights = torch.tensor(counts.sum() / (3 * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)

    peft_model = wrap_lora(model, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in peft_model.parameters())

    def val_loss() -> float:
        peft_model.eval()
        with torch.no_grad():
            total = sum(
                float(loss_fn(peft_model(xv[i : i + 512]), yv[i : i + 512])) * len(yv[i : i + 512])
                for i in range(0, len(yv), 512)
            )
        peft_model.train()
        return total / len(yv)

    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    train_curve: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = [(0, val_loss())]
    started = time.perf_counter()
    peft_model.train()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(xt), size=batch_size))
        loss = loss_fn(peft_model(xt[idx]), yt[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        train_curve.append((step, float(loss.detach())))
        if step % eval_every == 0 or step == steps:
            val_curve.append((step, val_loss()))
            if progress is not None:
                progress(step, train_curve[-1][1], val_curve[-1][1])
    peft_model.eval()
    seconds = time.perf_counter() - started

    adapter = out / ADAPTER_DIR
    peft_model.save_pretrained(str(adapter))
    unloaded = peft_model.merge_and_unload()
    merged = getattr(unloaded, "signal", None)
    if not isinstance(merged, QwenSignalModel):
        raise EngineError(f"merging the LoRA adapter gave a {type(unloaded).__name__}, not the signal model")
    merged.eval()
    with torch.no_grad():
        pred = torch.cat([merged(normalise(xh[i : i + 1024])).argmax(-1) for i in range(0, len(xh), 1024)]).numpy()
    lora = {
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": list(target_modules or DEFAULT_TARGET_MODULES),
        "modules_to_save": list(MODULES_TO_SAVE),
    }
    loss_png = out / LOSS_PNG if plot else None
    if loss_png is not None:
        plot_losses(
            train_curve, val_curve, loss_png, title=f"LoRA r={rank} a={alpha} on {base.parent.name}/{base.name}"
        )
    report = FinetuneReport(
        steps=steps,
        seconds=seconds,
        base_kind="signal checkpoint" if own_norms else "plain Qwen3",
        trainable_parameters=n_trainable,
        total_parameters=n_total,
        train_loss=tuple(train_curve),
        val_loss=tuple(val_curve),
        holdout_accuracy=float((pred == yh).mean()),
        holdout_direction_accuracy=direction_accuracy(pred, rh),
        holdout_samples=len(yh),
        adapter=adapter,
        loss_png=loss_png,
        lora=lora,
    )
    training = {
        "method": "lora",
        "base": str(base),
        "base_kind": report.base_kind,
        "base_training": dict(meta.training) if own_norms else {},
        "lora": lora,
        "data": data,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "hold_band": hold_band,
        "val_loss_first": round(report.first_val_loss, 4),
        "val_loss_last": round(report.last_val_loss, 4),
        "holdout_accuracy": round(report.holdout_accuracy, 4),
        "holdout_direction_accuracy": round(report.holdout_direction_accuracy, 4),
        "trainable_parameters": n_trainable,
    }
    out_meta = SignalMeta(
        name=name or (f"{meta.name}-lora" if own_norms else meta.name),
        version=version or meta.version,
        window=window,
        features=norms,
        training=training,
    )
    return merged, out_meta, report


def plot_losses(
    train_curve: Sequence[tuple[int, float]], val_curve: Sequence[tuple[int, float]], path: Path, *, title: str
) -> None:
    """Training (per step, and its running mean) and validation loss against step, as a PNG."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as exc:
        raise EngineError("the loss plot needs matplotlib: pip install 'tradingd[report]'") from exc
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    steps = np.asarray([s for s, _ in train_curve])
    losses = np.asarray([v for _, v in train_curve])
    ax.plot(steps, losses, color="0.75", linewidth=0.8, label="train (batch)")
    span = max(1, len(losses) // 20)
    if span > 1:
        smooth = np.convolve(losses, np.ones(span) / span, mode="valid")
        ax.plot(steps[span - 1 :], smooth, color="C0", label=f"train (mean of {span})")
    ax.plot([s for s, _ in val_curve], [v for _, v in val_curve], "o-", color="C3", label="validation (last 20 %)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
