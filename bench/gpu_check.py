"""The GPU check's measurements (run by bench/gpu_check.sh on a machine with an NVIDIA GPU).

For every batch bucket of the shipped model:

- host<->device copy latency of one batch (input [B, W, F] in, logits [B, 3] out, then a
  synchronise) from page-locked memory (engines.cuda.PinnedArray) and from pageable numpy memory;
- one inference-shaped step (copy in, one kernel, copy out, synchronise) launched plainly and
  replayed as a CUDA graph (engines.cuda.Graph), which is what the TensorRT backend does per bucket;
- the shipped Qwen signal model's compute in fp16 through PyTorch, eager and as a CUDA graph
  (GPU time from CUDA events, and wall time of replay + synchronise), the whole step an engine
  takes per batch (fp32 batch from pinned memory in, cast, replay, logits out, synchronise), with
  its logits compared with ONNX Runtime's fp32 logits on the same inputs;

and once: the device facts (cuda-python), an NVML health snapshot, and whether the lean TensorRT
runtime starts on this GPU. The buckets are the manifest's (1 to 256) and the full-market sizes
512 to 8,192 unless --buckets names others. From the model's figures it builds ``gpu_time_table``
(per bucket: GPU and wall ms, p50 and p99; the table the timing engine reads; schema in
bench/RESULTS.md), then runs the largest bucket back to back for --load-seconds with NVML read
every second (bench/gpu_load.py; per-second samples in gpu_load.json). Writes gpu_check.json,
gpu_check.md and gpu_load.json to --out.

    python bench/gpu_check.py --out DIR [--iters 2000] [--buckets 1,8,...] [--load-seconds 120]
    python bench/gpu_check.py --out /tmp/dry --dry-run --iters 5 --buckets 1,8 --load-seconds 2  # no GPU
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


class QwenRunner:
    """The shipped model on one bucket: fp16 on the GPU captured as a CUDA graph, or (``dry_run``)
    fp32 on the CPU called eagerly, so that a CPU dry run walks the same code paths."""

    def __init__(self, model: Any, batch: np.ndarray, dry_run: bool) -> None:
        import torch  # noqa: PLC0415

        self.torch = torch
        self.dry_run = dry_run
        self.model = model
        b = batch.shape[0]
        if dry_run:
            self.static_in = torch.from_numpy(batch).clone()
            self.host_in = torch.from_numpy(batch).clone()
            self.dev_in32 = self.static_in
            self.host_out = torch.empty((b, 3), dtype=torch.float32)
            self.graph = None
            with torch.no_grad():
                self.static_out = model(self.static_in)
            return
        self.static_in = torch.from_numpy(batch).half().cuda()
        self.host_in = torch.from_numpy(batch).pin_memory()
        self.dev_in32 = torch.empty(batch.shape, dtype=torch.float32, device="cuda")
        self.host_out = torch.empty((b, 3), dtype=torch.float32).pin_memory()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                self.static_out = model(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = model(self.static_in)
        self.graph.replay()
        torch.cuda.synchronize()
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def replay(self) -> None:
        if self.graph is None:
            with self.torch.no_grad():
                self.static_out = self.model(self.static_in)
        else:
            self.graph.replay()

    def sync(self) -> None:
        if self.graph is not None:
            self.torch.cuda.synchronize()

    def logits(self) -> np.ndarray:
        out: np.ndarray = self.static_out.float().cpu().numpy()
        return out

    def graph_step(self) -> None:
        """One replay, then wait for it (the graph wall figure)."""
        self.replay()
        self.sync()

    def eager_step(self) -> None:
        with self.torch.no_grad():
            self.model(self.static_in)
        self.sync()

    def full_step(self) -> None:
        """What an engine does per batch: the fp32 batch from page-locked host memory to the GPU,
        cast to fp16, replay, logits back to page-locked host memory as fp32, synchronise."""
        self.dev_in32.copy_(self.host_in, non_blocking=True)
        self.static_in.copy_(self.dev_in32)
        self.replay()
        self.host_out.copy_(self.static_out, non_blocking=True)
        self.sync()

    def gpu_timed(self) -> tuple[int, int]:
        """(GPU ns by CUDA events, wall ns by perf_counter_ns) of one replay + synchronise; in a
        dry run both are the wall time."""
        t0 = time.perf_counter_ns()
        if self.graph is None:
            self.replay()
            w = time.perf_counter_ns() - t0
            return w, w
        self.start.record()
        self.graph.replay()
        self.end.record()
        self.end.synchronize()
        w = time.perf_counter_ns() - t0
        return int(self.start.elapsed_time(self.end) * 1e6), w

    def close(self) -> None:
        self.graph = None


def load_model(dry_run: bool) -> Any:
    from engines.model.qwen_signal import load_checkpoint  # noqa: PLC0415

    model, _ = load_checkpoint(DEFAULT_MODEL.parent / "checkpoint")
    return model.eval() if dry_run else model.half().cuda().eval()


def qwen_fp16(
    buckets: tuple[int, ...], window: int, features: int, iters: int, dry_run: bool = False
) -> dict[str, Any]:
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415

    model = load_model(dry_run)
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "precision": "fp32 on the CPU, eager (DRY RUN)" if dry_run else "fp16, CUDA graph",
    }
    for b in buckets:
        rng = np.random.default_rng(100 + b)
        batch = rng.standard_normal((b, window, features)).astype(np.float32)
        runner = QwenRunner(model, batch, dry_run)
        ref = session.run(None, {session.get_inputs()[0].name: batch})[0]
        got = runner.logits()
        delta = float(np.abs(got - ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        for _ in range(50):
            runner.gpu_timed()
        gpu_ns = [runner.gpu_timed()[0] for _ in range(iters)]
        # The full step's logits must be the graph's: the copies carry the batch both ways.
        runner.full_step()
        step_ok = bool(np.array_equal(runner.host_out.numpy(), runner.logits()))
        out[str(b)] = {
            "max_abs_logit_delta_vs_onnx_fp32": round(delta, 4),
            "class_agreement_vs_onnx_fp32": round(agree, 4),
            "graph_gpu_time": pct(gpu_ns),
            "graph_wall": pct(timed(runner.graph_step, iters)),
            "step_wall": pct(timed(runner.full_step, iters)),
            "step_logits_match_graph": step_ok,
            "eager_wall": pct(timed(runner.eager_step, max(200, iters // 4) if not dry_run else iters)),
        }
        print(
            f"gpu_check: qwen bucket {b}: GPU p50 {out[str(b)]['graph_gpu_time']['p50_us']} us, "
            f"wall p50 {out[str(b)]['graph_wall']['p50_us']} us, max delta {delta:.4f}, agree {agree:.4f}",
            flush=True,
        )
        runner.close()
        del runner
        if not dry_run:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return out


def gpu_time_table(results: dict[str, Any], manifest: Any) -> dict[str, Any]:
    """The per-bucket GPU-time table the timing engine reads (schema in bench/RESULTS.md)."""
    q = results.get("qwen_fp16", {})
    if not isinstance(q, dict) or "error" in q:
        raise RuntimeError("no qwen_fp16 measurements to tabulate")
    rows: dict[str, Any] = {}
    for key in sorted((k for k in q if k.isdigit()), key=int):
        m = q[key]
        rows[key] = {
            "gpu_ms_p50": round(m["graph_gpu_time"]["p50_us"] / 1000, 4),
            "gpu_ms_p99": round(m["graph_gpu_time"]["p99_us"] / 1000, 4),
            "wall_ms_p50": round(m["graph_wall"]["p50_us"] / 1000, 4),
            "wall_ms_p99": round(m["graph_wall"]["p99_us"] / 1000, 4),
            "step_wall_ms_p50": round(m["step_wall"]["p50_us"] / 1000, 4),
            "step_wall_ms_p99": round(m["step_wall"]["p99_us"] / 1000, 4),
            "measured": True,
        }
    d, h = results.get("device", {}), results.get("nvml", {})
    return {
        "schema": 1,
        "model": f"{manifest.name} {manifest.version}",
        "model_sha256": manifest.sha256,
        "window": manifest.window,
        "features": manifest.n_features,
        "precision": q.get("precision"),
        "runtime": f"torch {q.get('torch')}, one CUDA-graph replay per batch",
        "gpu": d.get("name"),
        "driver": h.get("driver"),
        "date": results["date"],
        "dry_run": results.get("dry_run", False),
        "iters": results["iters"],
        "clocks": {
            "gpu_ms": "CUDA events recorded around one graph replay on the current stream",
            "wall_ms": "perf_counter_ns around graph replay + torch.cuda.synchronize",
            "step_wall_ms": "perf_counter_ns around: fp32 batch pinned host->GPU, cast to fp16, replay, "
            "logits GPU->pinned host, synchronize",
        },
        "extrapolation": "none: every row here was measured; a reader that extends past the largest "
        "bucket must mark what it computes measured: false",
        "buckets": rows,
    }


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
    table = r.get("gpu_time_table", {})
    if isinstance(table, dict) and "buckets" in table:
        lines += [
            "",
            "## GPU-time table (gpu_check.json → gpu_time_table; ms)",
            "",
            f"{table['precision']}; {table['runtime']}; {table['gpu']}, driver {table['driver']}",
            "",
            "| bucket | GPU p50 | GPU p99 | wall p50 | wall p99 | step wall p50 | step wall p99 | measured |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for b, row in table["buckets"].items():
            lines.append(
                f"| {b} | {row['gpu_ms_p50']} | {row['gpu_ms_p99']} | {row['wall_ms_p50']} | {row['wall_ms_p99']} | "
                f"{row['step_wall_ms_p50']} | {row['step_wall_ms_p99']} | {row['measured']} |"
            )
    load = r.get("sustained_load", {})
    if isinstance(load, dict) and "replays" in load:
        nv = load["nvml"]
        lines += [
            "",
            f"## Sustained load: bucket {load['bucket']} back to back for {load['seconds']} s",
            "",
            f"- replays {load['replays']}, rows/s {load['rows_per_s']}, GPU busy share (sum of event times / wall) "
            f"{load['gpu_busy_share']}",
            f"- GPU time (ms): {load['gpu_time']}",
            f"- wall (ms): {load['wall']}",
            f"- GPU p50 first vs last twelfth (ms): {load['gpu_p50_first_vs_last_ms']}",
            f"- temperature °C {nv['temperature_c']}, utilisation % {nv['utilization_pct']}, "
            f"memory utilisation % {nv['memory_utilization_pct']}",
            f"- SM clock MHz {nv['sm_clock_mhz']}, memory clock MHz {nv['mem_clock_mhz']}, power W {nv['power_w']}",
            f"- throttle reasons (seconds): {nv['throttle_reasons_seconds']}; ECC: {nv['ecc']}",
            f"- over the guide's limits ({nv['limits']}): {nv['seconds_over_temperature_limit']} s over temperature, "
            f"{nv['seconds_over_utilization_limit']} s over utilisation",
            f"- GPU limits read from NVML: {load['nvml_limits']}",
            f"- the daemon's GpuMonitor at {load['monitor']['max_temperature_c']} °C: "
            f"faults {load['monitor']['faults']}"
            f"{', error ' + str(load['monitor']['error']) if load['monitor']['error'] else ''}",
        ]
    lines += ["", "## Lean TensorRT runtime", "", "```", json.dumps(r.get("tensorrt_lean"), indent=1), "```"]
    if r.get("nvml_after"):
        lines += ["", "## NVML after everything", "", "```", json.dumps(r.get("nvml_after"), indent=1), "```"]
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "## Sections that failed", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def sustained(bucket: int, window: int, features: int, seconds: float, out: Path, dry_run: bool) -> dict[str, Any]:
    from bench.gpu_load import sustained_load  # noqa: PLC0415

    batch = np.random.default_rng(100 + bucket).standard_normal((bucket, window, features)).astype(np.float32)
    runner = QwenRunner(load_model(dry_run), batch, dry_run)
    try:
        return sustained_load(
            runner.graph_step,
            runner.gpu_timed,
            bucket=bucket,
            seconds=seconds,
            out=out,
            idle_before_s=1.0 if dry_run else 3.0,
            idle_after_s=1.0 if dry_run else 10.0,
        )
    finally:
        runner.close()


LARGE_BUCKETS = (512, 1024, 2048, 4096, 8192)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument(
        "--buckets",
        help="comma-separated batch sizes (default: the manifest's buckets, then 512 to 8192, full-market sizes)",
    )
    parser.add_argument(
        "--load-seconds", type=float, default=120, help="sustained load on the largest bucket (0: skip)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on a machine without a GPU: skip the cuda-python sections and run the model in fp32 on the CPU, "
        "to check the script end to end; the figures mean nothing",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(DEFAULT_MODEL)
    window, features = manifest.window, manifest.n_features
    if args.buckets:
        buckets = tuple(int(b) for b in args.buckets.split(","))
    else:
        buckets = tuple(sorted({*manifest.batch_buckets, *LARGE_BUCKETS}))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "iters": args.iters,
        "buckets": list(buckets),
        "_out": args.out,
    }
    if args.dry_run:
        results["dry_run"] = True
    else:
        section("device", _facts, results)
        section("nvml", _nvml, results)
        cc = results["device"].get("compute_capability", "9.0")
        section("copies", lambda: copies(buckets, window, features, args.iters), results)
        section("graphs", lambda: graphs(buckets, window, features, cc, args.iters), results)
    section("qwen_fp16", lambda: qwen_fp16(buckets, window, features, args.iters, args.dry_run), results)
    section("gpu_time_table", lambda: gpu_time_table(results, manifest), results)
    if not args.dry_run:
        section("tensorrt_lean", lean_runtime, results)
    if args.load_seconds > 0:
        section(
            "sustained_load",
            lambda: sustained(max(buckets), window, features, args.load_seconds, args.out, args.dry_run),
            results,
        )
    if not args.dry_run:
        section("nvml_after", _nvml, results)
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
