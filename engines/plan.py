"""Build a version-compatible TensorRT plan from an exported ONNX model, one optimisation
profile per batch bucket, and record it in the model's manifest.

Needs the full ``tensorrt`` package (the builder) and a GPU; the lean runtime cannot build.
Not yet run anywhere: no machine this project has had could install full TensorRT (its libs
wheel is fetched from NVIDIA's own index at install time).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Literal

import msgspec

from engines.cuda import probe_device
from engines.errors import BackendUnavailableError, PlanError
from engines.manifest import (
    TensorRTBuild,
    encode_manifest,
    load_manifest,
    manifest_path_for,
    sha256_file,
)


def import_full_tensorrt() -> ModuleType:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        lean = ""
        try:
            importlib.import_module("tensorrt_lean_bindings")
            lean = " Only the lean runtime is installed here, and it cannot build plans."
        except ImportError:
            pass
        raise BackendUnavailableError(
            f"building a plan needs the full TensorRT package (pip install 'tradingd[gpu]'), "
            f"which is not installed ({exc}).{lean}"
        ) from exc


def build_plan(
    onnx_path: Path,
    out: Path,
    *,
    workspace_mib: int = 1024,
    fp16: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> TensorRTBuild:
    """Build ``out`` (a ``.plan``) from ``onnx_path``; write the manifest beside ``out``."""
    if out.suffix != ".plan":
        raise PlanError(f"{out}: a plan file must end in .plan (its manifest is <stem>.manifest.json)")
    trt = import_full_tensorrt()
    manifest = load_manifest(onnx_path)
    facts = probe_device()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path}")
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PlanError(f"{onnx_path}: TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    precision: Literal["fp32", "fp16"] = "fp32"
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise PlanError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing only): "
                "export the model in mixed precision instead"
            )
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16"
    window, n_features = manifest.window, manifest.n_features
    for bucket in manifest.batch_buckets:
        profile = builder.create_optimization_profile()
        shape = (bucket, window, n_features)
        profile.set_shape(manifest.input.name, shape, shape, shape)
        config.add_optimization_profile(profile)
    progress(f"building {len(manifest.batch_buckets)} profiles {list(manifest.batch_buckets)} (minutes)")
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise PlanError(f"{onnx_path}: TensorRT could not build the plan (see the log above)")
    tmp = out.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(blob))
    os.replace(tmp, out)
    build = TensorRTBuild(
        version=trt.__version__,
        compute_capability=facts.compute_capability,
        version_compatible=True,
        plan_file=out.name,
        plan_sha256=sha256_file(out),
        precision=precision,
        gpu=facts.name,
    )
    target = manifest_path_for(out)
    updated = msgspec.structs.replace(manifest, tensorrt=build)
    target.write_bytes(encode_manifest(updated))
    progress(f"wrote {out} and {target}")
    return build
