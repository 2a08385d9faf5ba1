"""Inference latency of a model per batch bucket, with a baseline in the same run.

    python -m bench.engine_latency [--model PATH] [--iterations N] [--threads T]

Measures the daemon's path (IOBinding onto preallocated buffers, ``engine.infer``) and, as the
baseline, a plain ``InferenceSession.run`` on the same session options and inputs, alternating
the two per iteration so machine noise hits both alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.base import EngineSpec
from engines.chooser import DEFAULT_MODEL
from engines.onnxruntime import OnnxRuntimeEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    engine = OnnxRuntimeEngine(EngineSpec("bench", "onnxruntime", args.model, intra_op_threads=args.threads))
    engine.warm_up()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    plain = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    m = engine.manifest
    rng = np.random.default_rng(0)
    print(
        f"model {m.name} {m.version} ({args.model}), onnxruntime {ort.__version__}, "
        f"{args.threads} intra-op thread(s), {args.iterations} iterations, {platform.processor() or platform.machine()}"
    )
    print()
    print("| bucket | engine.infer p50 µs | p99 µs | max µs | plain run() p50 µs | p99 µs | per row p50 µs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for bucket in engine.buckets:
        x = rng.standard_normal((bucket, m.window, m.n_features)).astype(np.float32)
        engine.input_buffer(bucket)[:] = x
        plain.run(None, {m.input.name: x})
        ours, base = [], []
        for _ in range(args.iterations):
            t = time.perf_counter_ns()
            engine.infer(bucket)
            ours.append(time.perf_counter_ns() - t)
            t = time.perf_counter_ns()
            plain.run(None, {m.input.name: x})
            base.append(time.perf_counter_ns() - t)
        o50, o99 = np.percentile(ours, [50, 99]) / 1000
        b50, b99 = np.percentile(base, [50, 99]) / 1000
        print(
            f"| {bucket} | {o50:.0f} | {o99:.0f} | {max(ours) / 1000:.0f} "
            f"| {b50:.0f} | {b99:.0f} | {o50 / bucket:.1f} |"
        )


if __name__ == "__main__":
    main()
