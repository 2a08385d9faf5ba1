"""A Qwen3 decoder stack that reads a window of bar features and says sell, hold or buy.

The backbone is transformers' ``Qwen3Model``, fed through ``inputs_embeds`` by a linear
projection of the F bar features; a 3-way head reads the last position. A checkpoint is a
directory: ``config.json`` + ``model.safetensors`` (the backbone, exactly as transformers saves
it, so a real Qwen3 checkpoint loads through the same call) and ``signal_head.safetensors`` +
``signal.json`` (projection, head, features, normalisation, window).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from engines.errors import EngineError

HEAD_FILE = "signal_head.safetensors"
META_FILE = "signal.json"


@dataclass(frozen=True)
class FeatureNorm:
    name: str
    mean: float
    std: float
    clip: float = 5.0


@dataclass(frozen=True)
class SignalMeta:
    """What the model reads and how; written to ``signal.json`` and into the engine manifest."""

    name: str
    version: str
    window: int
    features: tuple[FeatureNorm, ...]
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SignalMeta:
        raw = json.loads(text)
        raw["features"] = tuple(FeatureNorm(**f) for f in raw["features"])
        return cls(**raw)


def small_config(
    *,
    window: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
) -> Qwen3Config:
    """A Qwen3 config sized for the CPU budget; token embeddings are unused, so the vocabulary is tiny."""
    return Qwen3Config(
        vocab_size=8,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max(64, window),
        use_cache=False,
        tie_word_embeddings=False,
    )


class QwenSignalModel(nn.Module):
    """features [B, W, F] float32 -> logits [B, 3] in class order sell, hold, buy."""

    def __init__(self, backbone: Qwen3Model, n_features: int) -> None:
        super().__init__()
        hidden = backbone.config.hidden_size
        self.backbone = backbone
        self.proj = nn.Linear(n_features, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(inputs_embeds=self.proj(features), use_cache=False).last_hidden_state
        logits: torch.Tensor = self.head(hidden[:, -1, :])
        return logits


def new_model(meta: SignalMeta, config: Qwen3Config, seed: int) -> QwenSignalModel:
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return QwenSignalModel(Qwen3Model(config), meta.n_features)


def save_checkpoint(model: QwenSignalModel, meta: SignalMeta, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out)
    head = {f"proj.{k}": v for k, v in model.proj.state_dict().items()}
    head |= {f"head.{k}": v for k, v in model.head.state_dict().items()}
    save_file({k: v.contiguous() for k, v in head.items()}, str(out / HEAD_FILE))
    (out / META_FILE).write_text(meta.to_json())


def load_checkpoint(
    path: Path, *, meta: SignalMeta | None = None, init_head_seed: int | None = None
) -> tuple[QwenSignalModel, SignalMeta]:
    """Load a signal checkpoint, or a plain Qwen3 checkpoint (backbone only) through the same path.

    A plain Qwen3 checkpoint (``Qwen3Model`` or ``Qwen3ForCausalLM`` as transformers saves it)
    has no signal head and no ``signal.json``: pass ``meta`` for its features and window, and
    ``init_head_seed`` to start a fresh projection and head for fine-tuning.
    """
    if not (path / "config.json").is_file():
        raise EngineError(f"{path}: not a transformers checkpoint (no config.json)")
    meta_file = path / META_FILE
    if meta is None:
        if not meta_file.is_file():
            raise EngineError(f"{path}: no {META_FILE}; pass the features and window of this model")
        meta = SignalMeta.from_json(meta_file.read_text())
    config = Qwen3Config.from_pretrained(path)
    if config.model_type != "qwen3":
        raise EngineError(f"{path}: model_type {config.model_type!r} is not a Qwen3 checkpoint")
    backbone = Qwen3Model.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = QwenSignalModel(backbone, meta.n_features)
    head_file = path / HEAD_FILE
    if head_file.is_file():
        state = load_file(str(head_file))
        model.proj.load_state_dict({k.removeprefix("proj."): v for k, v in state.items() if k.startswith("proj.")})
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
    elif init_head_seed is not None:
        torch.manual_seed(init_head_seed)
        model.proj.reset_parameters()
        model.head.reset_parameters()
    else:
        raise EngineError(f"{path}: no {HEAD_FILE}; this is a bare Qwen3 backbone (initialise a head to fine-tune it)")
    return model.eval(), meta
