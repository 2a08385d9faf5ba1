"""CUDA through cuda-python (``cuda.bindings.runtime``): the device check, page-locked host
buffers, device buffers, one non-blocking stream, and CUDA-graph capture.

Everything here is plain CUDA runtime API; TensorRT only ever sees the device pointers and the
stream handle. A missing driver, a driver too old for the runtime, or no device at all are
``NoGpuError``/``DriverTooOldError`` with a sentence that says which, raised before any other
library (TensorRT above all, which crashes the process at exit when CUDA cannot initialise) is
touched.

Ran on a GPU: see ``bench/RESULTS.md`` (GPU check) for where and with what result.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.errors import BackendUnavailableError, EngineError


class CudaError(EngineError):
    """A CUDA runtime call failed; carries the call and the error's name."""

    def __init__(self, call: str, code: int, name: str) -> None:
        self.call, self.code, self.name = call, code, name
        super().__init__(f"{call} failed: {name} ({code})")


class NoGpuError(BackendUnavailableError):
    """No NVIDIA driver or no CUDA device on this machine."""


class DriverTooOldError(BackendUnavailableError):
    """The installed driver supports an older CUDA than the runtime needs."""


def _rt() -> Any:
    try:
        from cuda.bindings import runtime  # noqa: PLC0415 - the GPU path only
    except ImportError as exc:
        raise BackendUnavailableError(
            f"cuda-python is not installed ({exc}); install the 'gpu' or 'lean' extra: pip install 'tradingd[gpu]'"
        ) from exc
    return runtime


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python result tuple ``(err, *values)``; raise ``CudaError`` on failure."""
    rt = _rt()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise CudaError(call, int(err), name.decode() if isinstance(name, bytes) else str(name))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int
    driver_cuda: int  # 13000 = CUDA 13.0
    runtime_cuda: int

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def probe_device(index: int = 0) -> DeviceFacts:
    """Say which GPU this is, or why there is none usable. Touches nothing but the CUDA runtime."""
    rt = _rt()
    driver = check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
    runtime = check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    if driver == 0:
        raise NoGpuError("no GPU: no NVIDIA driver is installed (libcuda.so.1 cannot be loaded)")
    # CUDA's minor version compatibility: any driver of the runtime's major version will do
    # (a 13.3 runtime runs on a 13.0 driver, as seen on the GPU check's H200).
    if driver // 1000 < runtime // 1000:
        raise DriverTooOldError(
            f"GPU driver too old: it supports CUDA {_cuda_version(driver)}, "
            f"this CUDA runtime needs CUDA {runtime // 1000}.x; upgrade the NVIDIA driver"
        )
    err, count = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaErrorNoDevice or (err == rt.cudaError_t.cudaSuccess and count == 0):
        raise NoGpuError("no GPU: the NVIDIA driver is loaded but reports no CUDA device")
    if err == rt.cudaError_t.cudaErrorInsufficientDriver:
        raise DriverTooOldError(f"GPU driver too old for CUDA {_cuda_version(runtime)}")
    check((err, count), "cudaGetDeviceCount")
    if index >= count:
        raise NoGpuError(f"no GPU {index}: only {count} CUDA device(s)")
    check(rt.cudaSetDevice(index), "cudaSetDevice")
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceFacts(
        index=index,
        name=name.rstrip("\x00"),
        compute_capability=f"{props.major}.{props.minor}",
        total_memory=int(props.totalGlobalMem),
        driver_cuda=driver,
        runtime_cuda=runtime,
    )


class PinnedArray:
    """A numpy array over page-locked host memory (``cudaHostAlloc``), freed on ``close``."""

    def __init__(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> None:
        rt = _rt()
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.ptr = int(check(rt.cudaHostAlloc(self.nbytes, rt.cudaHostAllocDefault), "cudaHostAlloc"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array: npt.NDArray[Any] = np.frombuffer(memoryview(raw).cast("B"), dtype=self.dtype).reshape(shape)
        self.array[...] = 0

    def close(self) -> None:
        if self.ptr:
            check(_rt().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class DeviceArray:
    """``nbytes`` of device memory (``cudaMalloc``)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr = int(check(_rt().cudaMalloc(nbytes), "cudaMalloc"))

    def close(self) -> None:
        if self.ptr:
            check(_rt().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class Stream:
    """One non-blocking stream (never the legacy default stream, which serialises everything)."""

    def __init__(self) -> None:
        rt = _rt()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def __int__(self) -> int:
        return int(self.handle)

    def copy_in(self, dst: DeviceArray, src_ptr: int, nbytes: int) -> None:
        rt = _rt()
        check(
            rt.cudaMemcpyAsync(dst.ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle),
            "cudaMemcpyAsync(H2D)",
        )

    def copy_out(self, dst_ptr: int, src: DeviceArray, nbytes: int) -> None:
        rt = _rt()
        check(
            rt.cudaMemcpyAsync(dst_ptr, src.ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle),
            "cudaMemcpyAsync(D2H)",
        )

    def synchronize(self) -> None:
        check(_rt().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(_rt().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class Graph:
    """A CUDA graph captured from everything ``work`` enqueues on ``stream``, replayed by ``launch``."""

    def __init__(self, stream: Stream, work: Callable[[], None]) -> None:
        rt = _rt()
        self._stream = stream
        check(
            rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            work()
        except BaseException:
            # End the capture so the stream is usable again, then report what broke it.
            rt.cudaStreamEndCapture(stream.handle)
            raise
        self._graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")

    def launch(self) -> None:
        check(_rt().cudaGraphLaunch(self._exec, self._stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        rt = _rt()
        if self._exec is not None:
            check(rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            check(rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._exec = None


# Every cuda.bindings.runtime call this package makes, with the parameters it passes: checked
# against the installed cuda-python by tests/test_tensorrt_backend.py, so an API change fails CI.
CUDA_RUNTIME_API: dict[str, tuple[str, ...]] = {
    "cudaGetErrorName": ("error",),
    "cudaDriverGetVersion": (),
    "cudaRuntimeGetVersion": (),
    "cudaGetDeviceCount": (),
    "cudaSetDevice": ("device",),
    "cudaGetDeviceProperties": ("device",),
    "cudaHostAlloc": ("size", "flags"),
    "cudaFreeHost": ("ptr",),
    "cudaMalloc": ("size",),
    "cudaFree": ("devPtr",),
    "cudaStreamCreateWithFlags": ("flags",),
    "cudaStreamDestroy": ("stream",),
    "cudaMemcpyAsync": ("dst", "src", "count", "kind", "stream"),
    "cudaStreamSynchronize": ("stream",),
    "cudaStreamBeginCapture": ("stream", "mode"),
    "cudaStreamEndCapture": ("stream",),
    "cudaGraphInstantiate": ("graph", "flags"),
    "cudaGraphLaunch": ("graphExec", "stream"),
    "cudaGraphExecDestroy": ("graphExec",),
    "cudaGraphDestroy": ("graph",),
}
