"""Export a signal checkpoint to ONNX (dynamo exporter, dynamic batch) and write its manifest."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from engines.manifest import (
    CLASSES,
    FORMAT_VERSION,
    Feature,
    Manifest,
    Normalisation,
    OutputSpec,
    TensorSpec,
    encode_manifest,
    manifest_path_for,
    sha256_file,
)
from engines.model.qwen_signal import QwenSignalModel, SignalMeta

DEFAULT_BUCKETS: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
INPUT_NAME = "features"
OUTPUT_NAME = "logits"
MAX_BATCH = 8192


def export_onnx(
    model: QwenSignalModel,
    meta: SignalMeta,
    out_dir: Path,
    *,
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    budget_us: int = 5000,
) -> Path:
    """Write ``out_dir/model.onnx`` and ``model.manifest.json``; returns the model path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    model = model.eval()
    # An example batch of 2, not 1, so the exporter cannot specialise the batch dimension.
    example = torch.zeros(2, meta.window, meta.n_features, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # The exporter narrates through logging and warns about torch internals; keep the output ours.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            optimize=True,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    program.save(str(model_path))

    cfg = model.backbone.config
    manifest = Manifest(
        format=FORMAT_VERSION,
        name=meta.name,
        version=meta.version,
        model_file=model_path.name,
        sha256=sha256_file(model_path),
        input=TensorSpec(name=INPUT_NAME, dtype="float32", shape=("B", meta.window, meta.n_features)),
        output=OutputSpec(name=OUTPUT_NAME, dtype="float32", shape=("B", len(CLASSES)), classes=CLASSES),
        features=tuple(
            Feature(name=f.name, norm=Normalisation(kind="zscore", mean=f.mean, std=f.std, clip=f.clip))
            for f in meta.features
        ),
        batch_buckets=buckets,
        budget_us=budget_us,
        model={
            "architecture": "qwen3",
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
            "parameters": sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n),
            "exporter": f"torch {torch.__version__} dynamo",
        },
        training=dict(meta.training),
    )
    manifest_path_for(model_path).write_bytes(encode_manifest(manifest))
    return model_path
