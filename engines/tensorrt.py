"""TensorRT backend: a serialized plan run through the full ``tensorrt`` package or, where only
it is installed, the lean runtime (``tensorrt_lean_bindings``).

Per batch bucket: one execution context bound to that bucket's optimisation profile, a
page-locked host input ``[bucket, W, F]`` and output ``[bucket, 3]`` (the batcher gathers
straight into the input), and device buffers, all allocated once. An inference is one async
copy in, ``execute_async_v3``, one async copy out on one non-blocking stream, then a
synchronise; after a first plain run each bucket's sequence is captured as a CUDA graph and
replayed, falling back to plain launches (logged) where capture fails.

Load order matters: the GPU is probed with cuda-python first, so a machine without a GPU or
with a driver too old gets ``NoGpuError``/``DriverTooOldError`` before TensorRT is touched.

What has run where: the checks before deserialisation and every runtime call's signature are
tested in CI against the real lean runtime (no GPU). The buffers, stream and graph mechanics
(``engines.cuda``) ran on a GPU through ``bench/gpu_check.sh``; a plan has not been built or
run, because full TensorRT (the builder) could not be installed on any machine available.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from engines.base import EngineHealth, EngineSpec, smallest_bucket
from engines.cuda import DeviceArray, DeviceFacts, Graph, PinnedArray, Stream, probe_device
from engines.errors import BackendUnavailableError, InferenceError, ManifestError, ModelMismatchError, PlanError
from engines.manifest import Manifest, load_manifest

log = structlog.get_logger("tradingd.engines.tensorrt")

FLAVORS = ("tensorrt", "tensorrt_lean_bindings")


def import_tensorrt(prefer: str | None = None) -> tuple[ModuleType, str]:
    """The full ``tensorrt`` module if installed, else the lean runtime; ``(module, "full"|"lean")``."""
    names = [prefer] if prefer else list(FLAVORS)
    problems = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
            continue
        return module, "full" if name == "tensorrt" else "lean"
    raise BackendUnavailableError(
        "TensorRT is not installed: neither the full 'tensorrt' package nor the lean runtime "
        "'tensorrt_lean_bindings' (pip install tensorrt-lean-cu13-bindings tensorrt-lean-cu13-libs) "
        f"could be imported ({'; '.join(problems)})"
    )


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


def check_plan_compatible(manifest: Manifest, path: str, trt_version: str, flavor: str, facts: DeviceFacts) -> None:
    """Refuse, with the reason, a plan this runtime or this GPU cannot run."""
    build = manifest.tensorrt
    if build is None:
        raise ManifestError(
            path, "tensorrt", "no TensorRT build recorded; build the plan with `tradingd model build-plan`"
        )
    if build.compute_capability != facts.compute_capability and not build.hardware_compatible:
        raise PlanError(
            f"{path}: plan built for compute capability {build.compute_capability}, "
            f"this GPU ({facts.name}) is {facts.compute_capability}; rebuild the plan on this GPU model"
        )
    if flavor == "lean" and not build.version_compatible:
        raise PlanError(
            f"{path}: the lean TensorRT runtime runs only version-compatible plans, and this plan "
            f"(TensorRT {build.version}) was not built with version compatibility; rebuild it with "
            "`tradingd model build-plan`, which always does"
        )
    built, running = _version_tuple(build.version), _version_tuple(trt_version)
    if build.version_compatible:
        if running < built:
            raise PlanError(
                f"{path}: plan built with TensorRT {build.version}, newer than this runtime {trt_version}; "
                "a version-compatible plan runs only on the same or a later TensorRT"
            )
    elif build.version != trt_version:
        raise PlanError(
            f"{path}: plan built for TensorRT {build.version}, this runtime is {trt_version}; "
            "rebuild it, or build it with version compatibility"
        )


def _collecting_logger(trt: ModuleType) -> Any:
    """An ILogger that keeps errors (to put in our exception) and sends the rest to structlog."""

    class Logger(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("tensorrt", message=msg)
            elif level == int(trt.ILogger.Severity.WARNING):
                log.warning("tensorrt", message=msg)

    return Logger()


class _Bucket:
    """One batch bucket: its context, pinned host and device buffers, and maybe a CUDA graph."""

    def __init__(self, engine: Any, profile: int, bucket: int, m: Manifest, stream: Stream) -> None:
        self.size = bucket
        self.context = engine.create_execution_context()
        if self.context is None:
            raise PlanError(f"could not create an execution context for bucket {bucket} (out of GPU memory?)")
        self.context.set_optimization_profile_async(profile, int(stream))
        if not self.context.set_input_shape(m.input.name, (bucket, m.window, m.n_features)):
            raise PlanError(f"profile {profile} refused input shape {(bucket, m.window, m.n_features)}")
        self.host_in = PinnedArray((bucket, m.window, m.n_features), np.float32)
        self.host_out = PinnedArray((bucket, 3), np.float32)
        self.dev_in = DeviceArray(self.host_in.nbytes)
        self.dev_out = DeviceArray(self.host_out.nbytes)
        self.context.set_tensor_address(m.input.name, self.dev_in.ptr)
        self.context.set_tensor_address(m.output.name, self.dev_out.ptr)
        self.graph: Graph | None = None

    def enqueue(self, stream: Stream) -> None:
        stream.copy_in(self.dev_in, self.host_in.ptr, self.host_in.nbytes)
        if not self.context.execute_async_v3(int(stream)):
            raise InferenceError(f"execute_async_v3 refused bucket {self.size}")
        stream.copy_out(self.host_out.ptr, self.dev_out, self.host_out.nbytes)

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
        for buf in (self.host_in, self.host_out, self.dev_in, self.dev_out):
            buf.close()
        self.context = None


class TensorRTEngine:
    """An Engine over a serialized TensorRT plan (``*.plan`` beside its ``*.manifest.json``)."""

    backend = "tensorrt"

    def __init__(self, spec: EngineSpec, *, flavor: str | None = None, device: int = 0) -> None:
        trt, self.flavor = import_tensorrt(flavor)
        self.name = spec.name
        self.path = Path(spec.model)
        # CUDA first: TensorRT on a machine where CUDA cannot start is a crash at exit, not an error.
        self.device = probe_device(device)
        self.manifest = load_manifest(self.path)
        if spec.expect_sha256 and self.manifest.tensorrt and spec.expect_sha256 != self.manifest.tensorrt.plan_sha256:
            raise ModelMismatchError(str(self.path), "sha256", spec.expect_sha256, self.manifest.tensorrt.plan_sha256)
        check_plan_compatible(self.manifest, str(self.path), trt.__version__, self.flavor, self.device)

        self._logger = _collecting_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        assert self.manifest.tensorrt is not None
        if self.manifest.tensorrt.version_compatible:
            # A version-compatible plan carries its own lean runtime code: trusted, as we built it.
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise PlanError(f"{self.path}: TensorRT could not deserialize the plan: {'; '.join(self._logger.errors)}")
        profiles = self._check_io(trt)
        self.buckets = tuple(spec.batch_buckets or self.manifest.batch_buckets)
        missing = [b for b in self.buckets if b not in profiles]
        if missing:
            raise ModelMismatchError(str(self.path), "batch_buckets", sorted(profiles), list(self.buckets))

        self._stream = Stream()
        self._buckets = {b: _Bucket(self._engine, profiles[b], b, self.manifest, self._stream) for b in self.buckets}
        self._stream.synchronize()
        self._lock = threading.Lock()
        self._inferences = 0
        self._failures = 0
        self.graph_fallbacks: dict[int, str] = {}

    def _check_io(self, trt: ModuleType) -> dict[int, int]:
        """Names, dtypes and shapes as the manifest says; returns bucket -> profile index."""
        e, m, path = self._engine, self.manifest, str(self.path)
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        inputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [m.input.name]:
            raise ModelMismatchError(path, "input.name", [m.input.name], inputs)
        if outputs != [m.output.name]:
            raise ModelMismatchError(path, "output.name", [m.output.name], outputs)
        for name, field in ((m.input.name, "input.dtype"), (m.output.name, "output.dtype")):
            dtype = e.get_tensor_dtype(name)
            if dtype != trt.DataType.FLOAT:
                raise ModelMismatchError(path, field, "float32 I/O (the plan may compute in fp16 inside)", str(dtype))
        shape = tuple(e.get_tensor_shape(m.input.name))
        if shape[1:] != (m.window, m.n_features) or shape[0] != -1:
            raise ModelMismatchError(path, "input.shape", ["B", m.window, m.n_features], shape)
        out_shape = tuple(e.get_tensor_shape(m.output.name))
        if out_shape[1:] != (3,):
            raise ModelMismatchError(path, "output.shape", ["B", 3], out_shape)
        profiles: dict[int, int] = {}
        for p in range(e.num_optimization_profiles):
            lo, opt, hi = (tuple(d) for d in e.get_tensor_profile_shape(m.input.name, p))
            if lo[1:] != (m.window, m.n_features) or hi[1:] != (m.window, m.n_features):
                raise ModelMismatchError(path, f"profile {p}", ["B", m.window, m.n_features], [lo, hi])
            profiles.setdefault(int(opt[0]), p)
        return profiles

    def bucket_for(self, n: int) -> int:
        return smallest_bucket(self.buckets, n)

    def input_buffer(self, bucket: int) -> npt.NDArray[np.float32]:
        return self._buckets[bucket].host_in.array

    def infer(self, bucket: int) -> npt.NDArray[np.float32]:
        b = self._buckets[bucket]
        with self._lock:
            try:
                if b.graph is not None:
                    b.graph.launch()
                else:
                    b.enqueue(self._stream)
                self._stream.synchronize()
            except Exception as exc:
                self._failures += 1
                raise InferenceError(f"{self.name}: TensorRT failed on bucket {bucket}: {exc}") from exc
            self._inferences += 1
        return b.host_out.array

    def warm_up(self) -> None:
        """A plain run of every bucket (TensorRT settles shapes on it), then its graph capture."""
        for bucket, b in self._buckets.items():
            self.infer(bucket)
            try:
                b.graph = Graph(self._stream, lambda b=b: b.enqueue(self._stream))  # type: ignore[misc]
                self.infer(bucket)
            except Exception as exc:
                b.graph = None
                self.graph_fallbacks[bucket] = str(exc)
                log.warning("cuda_graph_capture_failed", engine=self.name, bucket=bucket, error=str(exc))
                self.infer(bucket)

    def health(self) -> EngineHealth:
        detail = f"{self.device.name} {self.device.compute_capability} TensorRT {self.flavor}"
        return EngineHealth(ok=True, detail=detail, inferences=self._inferences, failures=self._failures)

    def close(self) -> None:
        for b in self._buckets.values():
            b.close()
        self._buckets.clear()
        self._stream.close()
        self._engine = None


# Every TensorRT runtime call the backend makes: (class, member) -> the parameter names it
# passes, or "property", "enum", "enum value". tests/test_tensorrt_backend.py checks each against the installed lean
# runtime's own signatures, and checks that this module calls nothing outside this table.
TENSORRT_RUNTIME_API: dict[tuple[str, str], tuple[str, ...] | str] = {
    ("ILogger", "Severity"): "enum",
    ("ILogger", "ERROR"): "enum value",
    ("ILogger", "WARNING"): "enum value",
    ("ILogger", "__init__"): (),
    ("ILogger", "log"): ("severity", "msg"),
    ("Runtime", "__init__"): ("logger",),
    ("Runtime", "engine_host_code_allowed"): "property",
    ("Runtime", "deserialize_cuda_engine"): ("serialized_engine",),
    ("ICudaEngine", "num_io_tensors"): "property",
    ("ICudaEngine", "get_tensor_name"): ("index",),
    ("ICudaEngine", "get_tensor_mode"): ("name",),
    ("ICudaEngine", "get_tensor_dtype"): ("name",),
    ("ICudaEngine", "get_tensor_shape"): ("name",),
    ("ICudaEngine", "num_optimization_profiles"): "property",
    ("ICudaEngine", "get_tensor_profile_shape"): ("name", "profile_index"),
    ("ICudaEngine", "create_execution_context"): (),
    ("IExecutionContext", "set_optimization_profile_async"): ("profile_index", "stream_handle"),
    ("IExecutionContext", "set_input_shape"): ("name", "shape"),
    ("IExecutionContext", "set_tensor_address"): ("name", "memory"),
    ("IExecutionContext", "execute_async_v3"): ("stream_handle",),
}
