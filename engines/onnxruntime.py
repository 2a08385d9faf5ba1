"""ONNX Runtime backend (CPU): the engine wherever there is no GPU.

Each batch bucket owns a preallocated input and output array bound to the session through
IOBinding, so an inference reads the gathered batch in place and writes the logits in place.
ONNX Runtime releases the GIL while it runs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engines.base import EngineHealth, EngineSpec, smallest_bucket
from engines.errors import BackendUnavailableError, InferenceError, ModelMismatchError
from engines.manifest import load_manifest

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxRuntimeEngine:
    """An Engine over an ONNX model with a dynamic batch dimension."""

    backend = "onnxruntime"

    def __init__(self, spec: EngineSpec) -> None:
        try:
            # ONNX Runtime would otherwise report usage over the network (and touch a cache as
            # root): a trading daemon sends nothing anywhere it was not told to. Releases have
            # read one name or the other.
            os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
            os.environ.setdefault("ORT_TELEMETRY_DISABLED", "1")
            import onnxruntime as ort  # noqa: PLC0415 - backend-only import
        except ImportError as exc:
            raise BackendUnavailableError(f"onnxruntime is not installed: {exc}") from exc
        self.name = spec.name
        self.model_path = Path(spec.model)
        self.manifest = load_manifest(self.model_path)
        if spec.expect_sha256 and spec.expect_sha256 != self.manifest.sha256:
            raise ModelMismatchError(str(self.model_path), "sha256", spec.expect_sha256, self.manifest.sha256)
        self.buckets = tuple(spec.batch_buckets or self.manifest.batch_buckets)
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ModelMismatchError(
                str(self.model_path),
                "batch_buckets",
                "strictly increasing positive ints",
                self.buckets,
            )

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.intra_op_threads
        options.inter_op_num_threads = spec.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[spec.graph_optimization])
        # Spinning intra-op threads would steal the event loop's core between minutes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spec.allow_spinning else "0")
        self._session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        self._check_io()

        window, n_features = self.manifest.window, self.manifest.n_features
        self._inputs: dict[int, npt.NDArray[np.float32]] = {}
        self._outputs: dict[int, npt.NDArray[np.float32]] = {}
        self._bindings: dict[int, object] = {}
        for bucket in self.buckets:
            x = np.zeros((bucket, window, n_features), dtype=np.float32)
            y = np.zeros((bucket, 3), dtype=np.float32)
            binding = self._session.io_binding()
            binding.bind_ortvalue_input(self.manifest.input.name, ort.OrtValue.ortvalue_from_numpy(x))
            binding.bind_ortvalue_output(self.manifest.output.name, ort.OrtValue.ortvalue_from_numpy(y))
            self._inputs[bucket], self._outputs[bucket], self._bindings[bucket] = x, y, binding
        self._lock = threading.Lock()
        self._inferences = 0
        self._failures = 0

    def _check_io(self) -> None:
        model = str(self.model_path)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelMismatchError(
                model,
                "io",
                "one input and one output",
                f"{len(inputs)} inputs, {len(outputs)} outputs",
            )
        (i,), (o,) = inputs, outputs
        m = self.manifest
        if i.name != m.input.name:
            raise ModelMismatchError(model, "input.name", m.input.name, i.name)
        if _DTYPES.get(i.type) != m.input.dtype:
            raise ModelMismatchError(model, "input.dtype", m.input.dtype, i.type)
        if list(i.shape[1:]) != list(m.input.shape[1:]) or isinstance(i.shape[0], int):
            raise ModelMismatchError(model, "input.shape", ["batch", *m.input.shape[1:]], i.shape)
        if o.name != m.output.name:
            raise ModelMismatchError(model, "output.name", m.output.name, o.name)
        if list(o.shape[1:]) != list(m.output.shape[1:]):
            raise ModelMismatchError(model, "output.shape", list(m.output.shape), o.shape)

    def bucket_for(self, n: int) -> int:
        return smallest_bucket(self.buckets, n)

    def input_buffer(self, bucket: int) -> npt.NDArray[np.float32]:
        return self._inputs[bucket]

    def infer(self, bucket: int) -> npt.NDArray[np.float32]:
        binding = self._bindings[bucket]
        with self._lock:
            try:
                self._session.run_with_iobinding(binding)
            except Exception as exc:
                self._failures += 1
                raise InferenceError(f"{self.name}: onnxruntime failed on bucket {bucket}: {exc}") from exc
            self._inferences += 1
        return self._outputs[bucket]

    def warm_up(self) -> None:
        for bucket in self.buckets:
            self.infer(bucket)

    def health(self) -> EngineHealth:
        return EngineHealth(ok=True, detail="cpu", inferences=self._inferences, failures=self._failures)

    def close(self) -> None:
        self._bindings.clear()
