"""How big a Qwen3 signal model fits the minute: CPU measured, GPU estimated, per model shape.

    python -m bench.model_sizes [--iterations N] [--max-call-s S] [--json PATH] [--quick]

For each shape (decoder layers x hidden size x window; randomly initialised, only the timing
matters) it exports the model with ``export_onnx``, counts parameters (token embeddings excluded,
as the manifest does) and FLOPs per row (matmuls, 2 per multiply-add, attention over the full
window), and measures the daemon's ONNX Runtime CPU engine (``engine.infer`` on a bucket's
preallocated buffer, one intra-op thread, as the daemon's default) per batch bucket, p50 and p99.

The GPU column is NOT a measurement: it scales the H200 table recorded for the shipped model
(``bench/gpu/gpu_check.json``, ``gpu_time_table``: fp16, CUDA graph, step wall incl. copies) by
FLOPs per row: a batch of B rows of a model k times the shipped model's FLOPs per row is taken to
cost what the shipped model measured for k*B rows (interpolated between measured buckets; past
the largest, 8192 rows, extrapolated linearly and marked).

The largest universe that fits a budget is the most rows (symbols with a bar that minute) whose
batches, run one after another at the p99 time, finish within it: on the CPU, full batches of the
largest measured bucket plus one smaller bucket; on the GPU (estimate), one batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engines.base import EngineSpec
from engines.features import DEFAULT_FEATURES
from engines.onnxruntime import OnnxRuntimeEngine

GPU_TABLE = Path(__file__).parent / "gpu" / "gpu_check.json"
BUCKETS = (1, 8, 32, 64, 128, 256, 512)
BUDGETS_MS = (5.0, 50.0)
N_FEATURES = len(DEFAULT_FEATURES)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    window: int
    label: str = ""

    @property
    def name(self) -> str:
        return f"L{self.layers} h{self.hidden} w{self.window}"


SHIPPED = Shape(2, 32, 4, 2, 8, 96, 16, "shipped qwen-signal-v1")
GRID = (
    SHIPPED,
    Shape(2, 128, 4, 2, 32, 384, 16),
    Shape(2, 256, 8, 4, 32, 768, 32),
    Shape(4, 512, 8, 4, 64, 1536, 32),
    Shape(2, 1024, 16, 8, 128, 3072, 16, "Qwen3-0.6B width, 2 of its 28 layers"),
    Shape(2, 1024, 16, 8, 128, 3072, 64, "Qwen3-0.6B width, 2 of its 28 layers"),
)


def flops_per_row(s: Shape) -> int:
    """Matmul FLOPs for one window: projections, MLP, attention scores and mix, input and head."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    linear = 2 * s.hidden * q + 2 * 2 * s.hidden * kv + 2 * q * s.hidden + 3 * 2 * s.hidden * s.intermediate
    attention = 2 * 2 * q * s.window  # QK^T and AV over the whole window, per query
    per_token = s.layers * (linear + attention) + 2 * N_FEATURES * s.hidden
    return s.window * per_token + 2 * s.hidden * 3


def export_shape(s: Shape, out: Path) -> tuple[Path, int]:
    import torch  # noqa: PLC0415
    from transformers import Qwen3Config, Qwen3Model  # noqa: PLC0415

    from engines.model.export import export_onnx  # noqa: PLC0415
    from engines.model.qwen_signal import FeatureNorm, QwenSignalModel, SignalMeta  # noqa: PLC0415

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=8,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        max_position_embeddings=max(64, s.window),
        use_cache=False,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    model = QwenSignalModel(Qwen3Model(config), N_FEATURES).eval()
    meta = SignalMeta(
        f"size-{s.name.replace(' ', '-')}", "0.0.0", s.window, tuple(FeatureNorm(n, 0.0, 1.0) for n in DEFAULT_FEATURES)
    )
    path = export_onnx(model, meta, out / s.name.replace(" ", "_"), buckets=BUCKETS)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return path, params


def measure_cpu(path: Path, iterations: int, max_call_s: float) -> dict[int, tuple[float, float]]:
    """Bucket -> (p50 ms, p99 ms); buckets stop once one call takes longer than ``max_call_s``."""
    engine = OnnxRuntimeEngine(EngineSpec("size", "onnxruntime", path, batch_buckets=BUCKETS, intra_op_threads=1))
    engine.warm_up()
    m = engine.manifest
    rng = np.random.default_rng(0)
    result: dict[int, tuple[float, float]] = {}
    for bucket in engine.buckets:
        engine.input_buffer(bucket)[:] = rng.standard_normal((bucket, m.window, m.n_features)).astype(np.float32)
        t = time.perf_counter_ns()
        engine.infer(bucket)
        one = (time.perf_counter_ns() - t) / 1e9
        # Fewer iterations for slow calls: about 2 s a bucket, never under 5.
        n = max(5, min(iterations, int(2.0 / max(one, 1e-6))))
        times = []
        for _ in range(n):
            t = time.perf_counter_ns()
            engine.infer(bucket)
            times.append(time.perf_counter_ns() - t)
        p50, p99 = np.percentile(times, [50, 99]) / 1e6
        result[bucket] = (float(p50), float(p99))
        if one > max_call_s:
            break
    return result


def cpu_universe(cpu: dict[int, tuple[float, float]], budget_ms: float) -> int:
    """Most rows whose batches (full largest buckets, then one smaller) fit the budget at p99."""
    biggest = max(cpu)
    full = cpu[biggest][1]
    best = 0
    k = 0
    while k * full <= budget_ms:
        left = budget_ms - k * full
        extra = max((b for b, (_, p99) in cpu.items() if p99 <= left and b < biggest), default=0)
        best = max(best, k * biggest + extra)
        k += 1
    return best


class GpuEstimate:
    """The shipped model's measured H200 step time per batch, read as a function of rows x FLOPs."""

    def __init__(self, table: dict[str, Any], key: str = "step_wall_ms_p99") -> None:
        rows = sorted((int(b), float(v[key])) for b, v in table["buckets"].items())
        self.rows = np.asarray([r for r, _ in rows], dtype=np.float64)
        self.ms = np.asarray([m for _, m in rows], dtype=np.float64)
        self.slope = (self.ms[-1] - self.ms[-2]) / (self.rows[-1] - self.rows[-2])
        self.key = key
        self.meta = {k: table.get(k) for k in ("model", "gpu", "precision", "runtime", "date")}

    def ms_for(self, shipped_rows: float) -> tuple[float, bool]:
        """Time for a batch that does ``shipped_rows`` shipped-model rows of work; and whether extrapolated."""
        if shipped_rows <= self.rows[-1]:
            return float(np.interp(shipped_rows, self.rows, self.ms)), False
        return float(self.ms[-1] + self.slope * (shipped_rows - self.rows[-1])), True

    def universe(self, ratio: float, budget_ms: float) -> tuple[int, bool]:
        lo, hi = 0, 10_000_000
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.ms_for(mid * ratio)[0] <= budget_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo, lo > 0 and self.ms_for(lo * ratio)[1]


def _machine() -> dict[str, str]:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model or platform.processor() or platform.machine(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "onnxruntime": ort.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt_universe(n: int, extrapolated: bool = False) -> str:
    text = f"{n:,}" if n else "0 (one row misses it)"
    return text + (" (extrap.)" if extrapolated else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="most iterations per bucket (fewer when slow)")
    parser.add_argument("--max-call-s", type=float, default=1.0, help="stop raising the bucket past this call time")
    parser.add_argument("--out", type=Path, help="keep the exported models here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="the first two shapes only (a smoke run)")
    args = parser.parse_args()

    gpu = GpuEstimate(json.loads(GPU_TABLE.read_text())["gpu_time_table"])
    shipped_flops = flops_per_row(SHIPPED)
    machine = _machine()
    shapes = GRID[:2] if args.quick else GRID
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        for s in shapes:
            started = time.perf_counter()
            path, params = export_shape(s, out)
            exported = time.perf_counter() - started
            cpu = measure_cpu(path, args.iterations, args.max_call_s)
            flops = flops_per_row(s)
            ratio = flops / shipped_flops
            row: dict[str, Any] = {
                "shape": s.name,
                "label": s.label,
                "layers": s.layers,
                "hidden": s.hidden,
                "heads": f"{s.heads}/{s.kv_heads}",
                "head_dim": s.head_dim,
                "intermediate": s.intermediate,
                "window": s.window,
                "parameters": params,
                "flops_per_row": flops,
                "flops_ratio": ratio,
                "export_s": round(exported, 1),
                "cpu_ms": {b: {"p50": p50, "p99": p99} for b, (p50, p99) in cpu.items()},
                "gpu_ms_estimate": {b: gpu.ms_for(b * ratio)[0] for b in BUCKETS},
                "cpu_universe": {str(int(b)): cpu_universe(cpu, b) for b in BUDGETS_MS},
                "gpu_universe_estimate": {str(int(b)): gpu.universe(ratio, b) for b in BUDGETS_MS},
            }
            rows.append(row)
            print(
                f"  {s.name}: exported in {exported:.0f} s, measured in {time.perf_counter() - started:.0f} s",
                flush=True,
            )

    print()
    print(
        f"Machine: {machine['nproc']} CPUs, {machine['cpu']}, load average {machine['load_average']} at start of"
        f" report; onnxruntime {machine['onnxruntime']} CPU, 1 intra-op thread; {machine['date']}."
    )
    print(
        f"GPU columns are ESTIMATES, not measurements: the H200 table measured on the shipped model"
        f" ({gpu.meta['model']}, {gpu.meta['precision']}, {gpu.key}, {gpu.meta['date']}) scaled by FLOPs per row."
    )
    print()
    print("Per bucket (ms): CPU measured p50 / p99, GPU estimated p99")
    print()
    print("| shape | " + " | ".join(f"B={b}" for b in BUCKETS) + " |")
    print("|---|" + "---:|" * len(BUCKETS))
    for r in rows:
        cells = []
        for b in BUCKETS:
            c = r["cpu_ms"].get(b)
            cpu_text = f"{c['p50']:.2f} / {c['p99']:.2f}" if c else "not run"
            cells.append(f"{cpu_text}; gpu≈{r['gpu_ms_estimate'][b]:.2f}")
        print(f"| {r['shape']} | " + " | ".join(cells) + " |")
    print()
    print("Largest universe (rows = symbols per minute) within a budget, at p99")
    print()
    print(
        "| shape | params | FLOPs/row | CPU 5 ms (measured) | CPU 50 ms (measured)"
        " | GPU 5 ms (estimate) | GPU 50 ms (estimate) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = f"{r['shape']} ({r['label']})" if r["label"] else r["shape"]
        g5, g50 = r["gpu_universe_estimate"]["5"], r["gpu_universe_estimate"]["50"]
        print(
            f"| {label} | {r['parameters'] / 1e6:.3f} M | {r['flops_per_row'] / 1e6:,.1f} M"
            f" | {_fmt_universe(r['cpu_universe']['5'])} | {_fmt_universe(r['cpu_universe']['50'])}"
            f" | {_fmt_universe(*g5)} | {_fmt_universe(*g50)} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "gpu_source": gpu.meta, "shapes": rows}, indent=2))


if __name__ == "__main__":
    main()
