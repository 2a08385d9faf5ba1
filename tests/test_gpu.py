"""The GPU path on a real GPU: pinned buffers, streams, CUDA graphs, NVML, the lean TensorRT
runtime, and the Qwen model in fp16 against ONNX Runtime. Every test here needs an NVIDIA GPU
and skips, saying why, where there is none; bench/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from engines.base import EngineSpec
from engines.chooser import DEFAULT_MODEL
from engines.errors import BackendUnavailableError, PlanError
from engines.manifest import TensorRTBuild, encode_manifest, load_manifest, sha256_file

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu() -> object:
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from engines.cuda import probe_device  # noqa: PLC0415

    try:
        return probe_device()
    except BackendUnavailableError as exc:
        pytest.skip(f"needs an NVIDIA GPU: {exc}")


def test_probe_device_names_the_gpu_and_its_compute_capability(gpu: object) -> None:
    from engines.cuda import DeviceFacts  # noqa: PLC0415

    assert isinstance(gpu, DeviceFacts)
    assert gpu.name and gpu.total_memory > 1 << 30
    major, minor = (int(x) for x in gpu.compute_capability.split("."))
    assert major >= 5 and minor >= 0
    assert gpu.driver_cuda // 1000 >= gpu.runtime_cuda // 1000


def test_pinned_batch_round_trips_through_device_memory_on_one_stream(gpu: object) -> None:
    from engines.cuda import DeviceArray, PinnedArray, Stream  # noqa: PLC0415

    stream = Stream()
    src = PinnedArray((64, 16, 6), np.float32)
    dst = PinnedArray((64, 16, 6), np.float32)
    dev = DeviceArray(src.nbytes)
    try:
        src.array[...] = np.random.default_rng(1).standard_normal(src.array.shape)
        stream.copy_in(dev, src.ptr, src.nbytes)
        stream.copy_out(dst.ptr, dev, dst.nbytes)
        stream.synchronize()
        assert np.array_equal(dst.array, src.array)
    finally:
        for buf in (src, dst, dev):
            buf.close()
        stream.close()


def test_cuda_graph_replay_reads_the_pinned_input_of_each_new_batch(gpu: object) -> None:
    from engines.cuda import DeviceArray, Graph, PinnedArray, Stream  # noqa: PLC0415

    stream = Stream()
    host_in = PinnedArray((32, 16, 6), np.float32)
    host_out = PinnedArray((32, 16, 6), np.float32)
    dev = DeviceArray(host_in.nbytes)

    def enqueue() -> None:
        stream.copy_in(dev, host_in.ptr, host_in.nbytes)
        stream.copy_out(host_out.ptr, dev, host_out.nbytes)

    enqueue()
    stream.synchronize()
    graph = Graph(stream, enqueue)
    try:
        for seed in range(3):
            host_in.array[...] = np.random.default_rng(seed).standard_normal(host_in.array.shape)
            graph.launch()
            stream.synchronize()
            assert np.array_equal(host_out.array, host_in.array), f"replay {seed} did not carry the new batch"
    finally:
        graph.close()
        for buf in (host_in, host_out, dev):
            buf.close()
        stream.close()


def test_nvml_snapshot_reads_the_same_gpu_and_a_healthy_one_has_no_faults(gpu: object) -> None:
    from engines.gpu_health import faults, read_health  # noqa: PLC0415

    g = read_health(0)
    assert g.name and g.driver
    assert g.memory_total_bytes is not None and g.memory_total_bytes > 1 << 30
    assert g.temperature_c is None or 0 < g.temperature_c < 120
    assert faults(g, max_temperature_c=200) == [] or g.xid_events or g.ecc_volatile_uncorrected
    # A limit below the reading is a fault that names the temperature.
    if g.temperature_c is not None:
        assert any("temperature" in f for f in faults(g, max_temperature_c=1))


def test_gpu_monitor_polls_and_stops(gpu: object) -> None:
    from engines.gpu_health import GpuMonitor  # noqa: PLC0415

    seen: list[str] = []
    monitor = GpuMonitor(0, 0.05, 200, seen.append)
    first = monitor.latest
    monitor.start()
    time.sleep(0.3)
    monitor.close()
    assert monitor.latest is not None and monitor.latest is not first
    assert seen == [] or monitor.faulted is not None


def test_tensorrt_runtime_starts_on_the_gpu_and_refuses_a_plan_that_is_not_one(gpu: object, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_lean_bindings", reason="the lean TensorRT runtime is not installed")
    from engines.cuda import DeviceFacts  # noqa: PLC0415
    from engines.tensorrt import TensorRTEngine, import_tensorrt  # noqa: PLC0415

    assert isinstance(gpu, DeviceFacts)
    trt, _ = import_tensorrt()
    shutil.copy(DEFAULT_MODEL, tmp_path / "model.onnx")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"this is not a TensorRT plan" * 64)
    manifest = load_manifest(DEFAULT_MODEL)
    build = TensorRTBuild(
        version=trt.__version__,
        compute_capability=gpu.compute_capability,
        version_compatible=True,
        plan_file=plan.name,
        plan_sha256=sha256_file(plan),
    )
    (tmp_path / "model.manifest.json").write_bytes(encode_manifest(msgspec.structs.replace(manifest, tensorrt=build)))
    with pytest.raises(PlanError, match="could not deserialize"):
        TensorRTEngine(EngineSpec("primary", "tensorrt", plan))


@pytest.mark.parametrize("rows", [256, 8192])
def test_qwen_fp16_on_the_gpu_matches_onnx_runtime_fp32(gpu: object, rows: int) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    import onnxruntime as ort  # noqa: PLC0415

    from engines.model.qwen_signal import load_checkpoint  # noqa: PLC0415

    model, _ = load_checkpoint(DEFAULT_MODEL.parent / "checkpoint")
    model = model.half().cuda().eval()
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    # 256 rows is the manifest's largest bucket; 8,192 a full market in one batch.
    batch = np.random.default_rng(5).standard_normal((rows, 16, 6)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(batch).half().cuda()).float().cpu().numpy()
    ref = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert np.abs(got - ref).max() < 0.05
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
