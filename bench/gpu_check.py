"""The GPU check's measurements (run by bench/gpu_check.sh on a machine with an NVIDIA GPU).

For every batch bucket of the shipped model:

- host<->device copy latency of one batch (input [B, W, F] in, logits [B, 3] out, then a
  synchronise) from page-locked memory (engines.cuda.PinnedArray) and from pageable numpy memory;
- one inference-shaped step (copy in, one kernel, copy out, synchronise) launched plainly and
  replayed as a CUDA graph (engines.cuda.Graph), which is what the TensorRT backend does per bucket;
- the shipped Qwen signal model's compute in fp16 through PyTorch, eager and as a CUDA graph
  (GPU time from CUDA events, and wall time of replay + synchronise), with its logits compared
  with ONNX Runtime's fp32 logits on the same inputs;

and once: the device facts (cuda-python), an NVML health snapshot, and whether the lean TensorRT
runtime starts on this GPU. Writes gpu_check.json and gpu_check.md to --out.

    python bench/gpu_check.py --out DIR [--iters 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.chooser import DEFAULT_MODEL  # noqa: E402
from engines.cuda import DeviceArray, Graph, PinnedArray, Stream, check, probe_device  # noqa: E402
from engines.manifest import load_manifest  # noqa: E402

KERNEL = r"""
extern "C" __global__ void last_step(const float* x, float* y, int window, int features) {
    // One block per row: logits[b, k] = x[b, window - 1, k] (a stand-in for the model's compute).
    int b = blockIdx.x;
    int k = threadIdx.x;
    if (k < 3) y[b * 3 + k] = x[(b * window + window - 1) * features + k];
}
"""


def pct(samples_ns: list[int] | np.ndarray) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"p50_us": round(p50, 2), "p99_us": round(p99, 2), "p999_us": round(p999, 2), "max_us": round(a.max(), 2)}


def timed(fn: Callable[[], None], iters: int, warm: int = 50) -> list[int]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def call(result: Any, what: str) -> Any:
    """Unpack an NVRTC or driver API result tuple ``(status, *values)``; status 0 is success."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise RuntimeError(f"{what} failed: {status!r}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


class Kernel:
    """A tiny kernel compiled with NVRTC and launched through the driver API on our stream."""

    def __init__(self, cc: str) -> None:
        from cuda.bindings import driver, nvrtc  # noqa: PLC0415

        self.driver = driver
        prog = call(nvrtc.nvrtcCreateProgram(KERNEL.encode(), b"last_step.cu", 0, [], []), "nvrtcCreateProgram")
        arch = f"--gpu-architecture=compute_{cc.replace('.', '')}".encode()
        err = nvrtc.nvrtcCompileProgram(prog, 1, [arch])[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = nvrtc.nvrtcGetProgramLogSize(prog)[1]
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            raise RuntimeError(f"NVRTC: {buf.decode(errors='replace')}")
        size = call(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = b" " * size
        call(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        call(driver.cuInit(0), "cuInit")
        module = call(driver.cuModuleLoadData(ptx), "cuModuleLoadData")
        self.function = call(driver.cuModuleGetFunction(module, b"last_step"), "cuModuleGetFunction")

    def launch(self, stream: Stream, x: DeviceArray, y: DeviceArray, rows: int, window: int, features: int) -> None:
        import ctypes  # noqa: PLC0415

        args = [ctypes.c_void_p(x.ptr), ctypes.c_void_p(y.ptr), ctypes.c_int(window), ctypes.c_int(features)]
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        hstream = self.driver.CUstream(int(stream))
        call(
            self.driver.cuLaunchKernel(self.function, rows, 1, 1, 32, 1, 1, 0, hstream, ctypes.addressof(ptrs), 0),
            "cuLaunchKernel",
        )


def copies(buckets: tuple[int, ...], window: int, features: int, iters: int) -> dict[str, Any]:
    from cuda.bindings import runtime as rt  # noqa: PLC0415

    stream = Stream()
    out: dict[str, Any] = {}
    for b in buckets:
        pin_in, pin_out = PinnedArray((b, window, features), np.float32), PinnedArray((b, 3), np.float32)
        page_in, page_out = np.zeros((b, window, features), np.float32), np.zeros((b, 3), np.float32)
        dev_in, dev_out = DeviceArray(pin_in.nbytes), DeviceArray(pin_out.nbytes)

        def pinned(
            pin_in: PinnedArray = pin_in,
            pin_out: PinnedArray = pin_out,
            dev_in: DeviceArray = dev_in,
            dev_out: DeviceArray = dev_out,
        ) -> None:
            stream.copy_in(dev_in, pin_in.ptr, pin_in.nbytes)
            stream.copy_out(pin_out.ptr, dev_out, pin_out.nbytes)
            stream.synchronize()

        def pageable(
            page_in: np.ndarray = page_in,
            page_out: np.ndarray = page_out,
            dev_in: DeviceArray = dev_in,
            dev_out: DeviceArray = dev_out,
        ) -> None:
            stream.copy_in(dev_in, page_in.ctypes.data, page_in.nbytes)
            stream.copy_out(page_out.ctypes.data, dev_out, page_out.nbytes)
            stream.synchronize()

        # Correctness first: what goes in comes back.
        pin_in.array[...] = np.random.default_rng(b).standard_normal(pin_in.array.shape)
        stream.copy_in(dev_in, pin_in.ptr, pin_in.nbytes)
        check(
            rt.cudaMemcpyAsync(
                page_in.ctypes.data, dev_in.ptr, pin_in.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle
            ),
            "cudaMemcpyAsync",
        )
        stream.synchronize()
        assert np.array_equal(page_in, pin_in.array), "round trip through the GPU changed the batch"
        out[str(b)] = {
            "bytes_in": pin_in.nbytes,
            "bytes_out": pin_out.nbytes,
            "pinned": pct(timed(pinned, iters)),
            "pageable": pct(timed(pageable, iters)),
        }
        for buf in (pin_in, pin_out, dev_in, dev_out):
            buf.close()
    stream.close()
    return out


def graphs(buckets: tuple[int, ...], window: int, features: int, cc: str, iters: int) -> dict[str, Any]:
    kernel = Kernel(cc)
    stream = Stream()
    out: dict[str, Any] = {}
    for b in buckets:
        x, y = PinnedArray((b, window, features), np.float32), PinnedArray((b, 3), np.float32)
        dx, dy = DeviceArray(x.nbytes), DeviceArray(y.nbytes)

        def enqueue(
            b: int = b, x: PinnedArray = x, y: PinnedArray = y, dx: DeviceArray = dx, dy: DeviceArray = dy
        ) -> None:
            stream.copy_in(dx, x.ptr, x.nbytes)
            kernel.launch(stream, dx, dy, b, window, features)
            stream.copy_out(y.ptr, dy, y.nbytes)

        def plain(enqueue: Callable[[], None] = enqueue) -> None:
            enqueue()
            stream.synchronize()

        plain()
        graph = Graph(stream, enqueue)

        def replay(graph: Graph = graph) -> None:
            graph.launch()
            stream.synchronize()

        # The graph reads the pinned input at replay time: a new batch needs no re-capture.
        x.array[...] = np.random.default_rng(b).standard_normal(x.array.shape)
        replay()
        assert np.array_equal(y.array, x.array[:, -1, :3]), "graph replay did not compute from the new input"
        out[str(b)] = {"plain": pct(timed(plain, iters)), "graph": pct(timed(replay, iters))}
        graph.close()
        for buf in (x, y, dx, dy):
            buf.close()
    stream.close()
    return out


def qwen_fp16(buckets: tuple[int, ...], window: int, features: int, iters: int) -> dict[str, Any]:
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from engines.model.qwen_signal import load_checkpoint  # noqa: PLC0415

    model, _ = load_checkpoint(DEFAULT_MODEL.parent / "checkpoint")
    model = model.half().cuda().eval()
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    out: dict[str, Any] = {"torch": torch.__version__}
    for b in buckets:
        rng = np.random.default_rng(100 + b)
        batch = rng.standard_normal((b, window, features)).astype(np.float32)
        static_in = torch.from_numpy(batch).half().cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                static_out = model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = model(static_in)
        graph.replay()
        torch.cuda.synchronize()
        ref = session.run(None, {session.get_inputs()[0].name: batch})[0]
        got = static_out.float().cpu().numpy()
        delta = float(np.abs(got - ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())

        def eager_step(static_in: Any = static_in) -> None:
            with torch.no_grad():
                model(static_in)
            torch.cuda.synchronize()

        def graph_step(graph: Any = graph) -> None:
            graph.replay()
            torch.cuda.synchronize()

        gpu_ns = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            gpu_ns.append(int(start.elapsed_time(end) * 1e6))
        out[str(b)] = {
            "max_abs_logit_delta_vs_onnx_fp32": round(delta, 4),
            "class_agreement_vs_onnx_fp32": round(agree, 4),
            "graph_gpu_time": pct(gpu_ns),
            "graph_wall": pct(timed(graph_step, iters)),
            "eager_wall": pct(timed(eager_step, max(200, iters // 4))),
        }
    return out


def lean_runtime() -> dict[str, Any]:
    from engines.tensorrt import _collecting_logger, import_tensorrt  # noqa: PLC0415

    probe_device()  # TensorRT on a machine where CUDA cannot start crashes at exit
    trt, flavor = import_tensorrt()
    logger = _collecting_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(b"not a plan" * 10)
    return {
        "flavor": flavor,
        "version": trt.__version__,
        "runtime_created": runtime is not None,
        "garbage_plan_refused": engine is None,
        "errors": logger.errors[:3],
    }


def section(name: str, fn: Callable[[], Any], results: dict[str, Any]) -> None:
    print(f"gpu_check: {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"gpu_check: {name} FAILED: {exc}", flush=True)
    print(f"gpu_check: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    out = results.get("_out")
    if isinstance(out, Path):  # written after every section, so a crash loses nothing before it
        (out / "gpu_check.json").write_text(
            json.dumps({k: v for k, v in results.items() if k != "_out"}, indent=1, default=str)
        )


def markdown(r: dict[str, Any]) -> str:
    d, h = r.get("device", {}), r.get("nvml", {})
    lines = [
        f"# GPU check, {r['date']}",
        "",
        f"- GPU: {d.get('name')} (compute capability {d.get('compute_capability')}), "
        f"driver {h.get('driver')}, CUDA driver {d.get('driver_cuda')} / runtime {d.get('runtime_cuda')}",
        f"- host: {r['host']}, Python {r['python']}, iterations per figure: {r['iters']}",
        "",
        "## NVML",
        "",
        "```",
        json.dumps(h, indent=1),
        "```",
        "",
        "## Copy in + copy out + synchronise, one batch (µs)",
        "",
        "| bucket | bytes in | pinned p50 | pinned p99 | pageable p50 | pageable p99 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b, c in r.get("copies", {}).items():
        if isinstance(c, dict) and "pinned" in c:
            lines.append(
                f"| {b} | {c['bytes_in']} | {c['pinned']['p50_us']} | {c['pinned']['p99_us']} | "
                f"{c['pageable']['p50_us']} | {c['pageable']['p99_us']} |"
            )
    lines += [
        "",
        "## Copy in + kernel + copy out + synchronise: plain launches vs CUDA-graph replay (µs)",
        "",
        "| bucket | plain p50 | plain p99 | graph p50 | graph p99 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b, g in r.get("graphs", {}).items():
        if isinstance(g, dict) and "plain" in g:
            lines.append(
                f"| {b} | {g['plain']['p50_us']} | {g['plain']['p99_us']} | "
                f"{g['graph']['p50_us']} | {g['graph']['p99_us']} |"
            )
    lines += [
        "",
        "## Shipped Qwen signal model, fp16, PyTorch (µs)",
        "",
        "| bucket | graph GPU p50 | graph GPU p99 | graph wall p50 | graph wall p99 | eager wall p50 | "
        "eager wall p99 | max Δlogit vs ORT fp32 | class agreement |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, q in r.get("qwen_fp16", {}).items():
        if isinstance(q, dict) and "graph_gpu_time" in q:
            lines.append(
                f"| {b} | {q['graph_gpu_time']['p50_us']} | {q['graph_gpu_time']['p99_us']} | "
                f"{q['graph_wall']['p50_us']} | {q['graph_wall']['p99_us']} | {q['eager_wall']['p50_us']} | "
                f"{q['eager_wall']['p99_us']} | {q['max_abs_logit_delta_vs_onnx_fp32']} | "
                f"{q['class_agreement_vs_onnx_fp32']} |"
            )
    lines += ["", "## Lean TensorRT runtime", "", "```", json.dumps(r.get("tensorrt_lean"), indent=1), "```"]
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "## Sections that failed", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(DEFAULT_MODEL)
    buckets, window, features = tuple(manifest.batch_buckets), manifest.window, manifest.n_features
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "iters": args.iters,
        "buckets": list(buckets),
        "_out": args.out,
    }
    section("device", _facts, results)
    section("nvml", _nvml, results)
    cc = results["device"].get("compute_capability", "9.0")
    section("copies", lambda: copies(buckets, window, features, args.iters), results)
    section("graphs", lambda: graphs(buckets, window, features, cc, args.iters), results)
    section("qwen_fp16", lambda: qwen_fp16(buckets, window, features, args.iters), results)
    section("tensorrt_lean", lean_runtime, results)
    del results["_out"]
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


def _facts() -> dict[str, Any]:
    return dataclasses.asdict(probe_device())


def _nvml() -> dict[str, Any]:
    from engines.gpu_health import faults, read_health  # noqa: PLC0415

    g = read_health(0)
    return {**g.as_dict(), "faults_at_87C": faults(g, 87)}


if __name__ == "__main__":
    sys.exit(main())
