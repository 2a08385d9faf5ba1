"""Sustained load on the GPU: one batch bucket of the shipped model replayed back to back, NVML read every second.

``sustained_load`` (called by bench/gpu_check.py on a GPU machine) replays the model's CUDA graph
for the largest bucket for ``seconds`` without pause, one replay + synchronise after another,
timing each (CUDA events for GPU time, ``perf_counter_ns`` for wall time), while a thread reads
NVML once a second (temperature, utilisation, SM and memory clocks, power, throttle reasons, ECC
counts, through ``engines.gpu_health.read_health`` plus a few raw readings) and the daemon's own
``GpuMonitor`` watches with the guide's temperature limit. It returns a summary for
gpu_check.json and writes the per-second samples to ``gpu_load.json``.

``plot`` draws those samples, with the guide's limits (80 °C, 85 % utilisation) marked:

    python -m bench.gpu_load plot bench/gpu/gpu_load.json bench/gpu/gpu_load.png
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The operating guide's limits for the GPU (the daemon's alert rules use the same numbers).
LIMIT_TEMPERATURE_C = 80
LIMIT_UTILIZATION_PCT = 85


def _extra_nvml(index: int) -> dict[str, Any]:
    """Readings read_health does not take: memory utilisation, the raw throttle mask, power limit."""
    import pynvml as nv  # noqa: PLC0415

    h = nv.nvmlDeviceGetHandleByIndex(index)
    out: dict[str, Any] = {}

    def put(key: str, fn: Callable[[], Any]) -> None:
        try:
            out[key] = fn()
        except nv.NVMLError as exc:  # a reading this GPU does not give
            out[key] = None
            out.setdefault("unsupported", []).append(f"{key}: {exc}")

    put("memory_utilization_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).memory)
    put("throttle_mask", lambda: hex(nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)))
    put("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
    put("pstate", lambda: int(nv.nvmlDeviceGetPerformanceState(h)))
    return out


def nvml_limits(index: int = 0) -> dict[str, Any]:
    """The GPU's own temperature thresholds and power limits, read once."""
    try:
        import pynvml as nv  # noqa: PLC0415

        nv.nvmlInit()
        h = nv.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {}
    for key, fn in (
        ("slowdown_temperature_c", lambda: nv.nvmlDeviceGetTemperatureThreshold(h, 1)),  # SLOWDOWN
        ("shutdown_temperature_c", lambda: nv.nvmlDeviceGetTemperatureThreshold(h, 0)),  # SHUTDOWN
        ("max_operating_temperature_c", lambda: nv.nvmlDeviceGetTemperatureThreshold(h, 3)),  # GPU_MAX
        ("enforced_power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
        ("max_sm_clock_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
        ("max_mem_clock_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
    ):
        try:
            out[key] = fn()
        except Exception as exc:
            out[key] = None
            out.setdefault("unsupported", []).append(f"{key}: {exc}")
    return out


class Sampler:
    """Reads NVML every ``period_s`` on its own thread; each sample carries its time since ``t0``."""

    def __init__(self, index: int, t0: float, period_s: float = 1.0) -> None:
        self.index = index
        self.t0 = t0
        self.period_s = period_s
        self.samples: list[dict[str, Any]] = []
        self.phase = "idle_before"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-load-nvml", daemon=True)

    def read(self) -> dict[str, Any]:
        from engines.gpu_health import read_health  # noqa: PLC0415

        t = time.perf_counter() - self.t0
        try:
            g = read_health(self.index).as_dict()
            g.update(_extra_nvml(self.index))
        except Exception as exc:
            g = {"error": f"{type(exc).__name__}: {exc}"}
        g["t_s"] = round(t, 3)
        g["phase"] = self.phase
        return g

    def _run(self) -> None:
        nxt = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append(self.read())
            nxt += self.period_s
            self._stop.wait(max(0.0, nxt - time.perf_counter()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _ms(a: np.ndarray) -> dict[str, float]:
    if a.size == 0:
        return {}
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {
        "p50_ms": round(float(p50), 4),
        "p99_ms": round(float(p99), 4),
        "p999_ms": round(float(p999), 4),
        "max_ms": round(float(a.max()), 4),
        "mean_ms": round(float(a.mean()), 4),
    }


def _series(samples: list[dict[str, Any]], key: str) -> list[float]:
    return [s[key] for s in samples if isinstance(s.get(key), int | float)]


def load_samples(
    samples: list[dict[str, Any]], load_start_s: float | None, load_end_s: float | None, period_s: float = 1.0
) -> list[dict[str, Any]]:
    """The samples that describe the load. NVML's utilisation (and the power average) covers the
    period before the reading, so a sample taken at ``t`` describes ``(t - period, t]``: it belongs
    to the load when that whole period lies inside it. The first sample flagged ``load`` is taken
    the instant the load starts and describes the idle second before; it is left out. Without a
    window (older files), the ``phase`` flag decides."""
    ok = [s for s in samples if "error" not in s]
    if load_start_s is None or load_end_s is None:
        return [s for s in ok if s.get("phase") == "load"]
    slack = 0.05
    return [s for s in ok if s["t_s"] - period_s >= load_start_s - slack and s["t_s"] <= load_end_s + slack]


def _span(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "mean": round(float(np.mean(values)), 2), "max": max(values)}


def summarise(
    samples: list[dict[str, Any]], load_start_s: float | None = None, load_end_s: float | None = None
) -> dict[str, Any]:
    """What the NVML samples of the load say (see ``load_samples``), against the guide's limits."""
    load = load_samples(samples, load_start_s, load_end_s)
    temps = _series(load, "temperature_c")
    utils = _series(load, "utilization_pct")
    reasons: dict[str, int] = {}
    for s in load:
        for r in s.get("throttle_reasons", []) or ["none"]:
            reasons[r] = reasons.get(r, 0) + 1
    ecc_keys = (
        "ecc_volatile_corrected",
        "ecc_volatile_uncorrected",
        "ecc_aggregate_corrected",
        "ecc_aggregate_uncorrected",
    )
    valid = [s for s in samples if "error" not in s]
    ecc = {k: {"first": valid[0].get(k), "last": valid[-1].get(k)} for k in ecc_keys} if valid else {}
    return {
        "samples": len(samples),
        "load_samples": len(load),
        "errors": sorted({s["error"] for s in samples if "error" in s}),
        "temperature_c": _span(temps),
        "utilization_pct": _span(utils),
        "memory_utilization_pct": _span(_series(load, "memory_utilization_pct")),
        "sm_clock_mhz": _span(_series(load, "sm_clock_mhz")),
        "mem_clock_mhz": _span(_series(load, "mem_clock_mhz")),
        "power_w": _span(_series(load, "power_w")),
        "throttle_reasons_seconds": reasons,
        "ecc": ecc,
        "limits": {"temperature_c": LIMIT_TEMPERATURE_C, "utilization_pct": LIMIT_UTILIZATION_PCT},
        "seconds_over_temperature_limit": sum(1 for t in temps if t > LIMIT_TEMPERATURE_C),
        "seconds_over_utilization_limit": sum(1 for u in utils if u > LIMIT_UTILIZATION_PCT),
    }


def sustained_load(
    replay: Callable[[], None],
    gpu_timed_replay: Callable[[], tuple[int, int]],
    *,
    bucket: int,
    seconds: float,
    out: Path,
    idle_before_s: float = 3.0,
    idle_after_s: float = 10.0,
    index: int = 0,
) -> dict[str, Any]:
    """Replay back to back for ``seconds``; ``gpu_timed_replay`` returns (gpu_ns, wall_ns) of one
    replay + synchronise. Writes ``out/gpu_load.json`` (per-second samples) and returns a summary."""
    faults: list[str] = []
    monitor = None
    monitor_error = None
    try:
        from engines.gpu_health import GpuMonitor  # noqa: PLC0415

        monitor = GpuMonitor(index, 1.0, LIMIT_TEMPERATURE_C, faults.append)
        monitor.start()
    except Exception as exc:
        monitor_error = f"{type(exc).__name__}: {exc}"

    for _ in range(20):  # warm: the graph's first replays
        replay()
    t0 = time.perf_counter()
    sampler = Sampler(index, t0)
    sampler.start()
    time.sleep(idle_before_s)
    sampler.phase = "load"
    start = time.perf_counter()
    t_ns: list[int] = []
    gpu_ns: list[int] = []
    wall_ns: list[int] = []
    deadline = start + seconds
    while time.perf_counter() < deadline:
        g, w = gpu_timed_replay()
        t_ns.append(time.perf_counter_ns())
        gpu_ns.append(g)
        wall_ns.append(w)
    end = time.perf_counter()
    sampler.phase = "idle_after"
    time.sleep(idle_after_s)
    sampler.stop()
    if monitor is not None:
        monitor.close()

    t_rel = (np.asarray(t_ns, dtype=np.float64) / 1e9) - t0
    gpu_ms = np.asarray(gpu_ns, dtype=np.float64) / 1e6
    wall_ms = np.asarray(wall_ns, dtype=np.float64) / 1e6
    per_second = []
    for sec in range(int(np.floor(start - t0)), int(np.ceil(end - t0))):
        m = (t_rel >= sec) & (t_rel < sec + 1)
        if m.any():
            per_second.append(
                {
                    "t_s": sec,
                    "replays": int(m.sum()),
                    "gpu_p50_ms": round(float(np.percentile(gpu_ms[m], 50)), 4),
                    "gpu_p99_ms": round(float(np.percentile(gpu_ms[m], 99)), 4),
                    "wall_p50_ms": round(float(np.percentile(wall_ms[m], 50)), 4),
                    "wall_p99_ms": round(float(np.percentile(wall_ms[m], 99)), 4),
                }
            )
    n = len(gpu_ms)
    tenth = max(1, n // 12)  # first and last ~10 s of a 2-minute run
    summary: dict[str, Any] = {
        "bucket": bucket,
        "seconds": round(end - start, 2),
        "replays": n,
        "rows_per_s": round(n * bucket / (end - start), 1) if n else 0,
        "gpu_busy_share": round(float(gpu_ms.sum() / 1000 / (end - start)), 4) if n else 0,
        "gpu_time": _ms(gpu_ms),
        "wall": _ms(wall_ms),
        "gpu_p50_first_vs_last_ms": [
            round(float(np.percentile(gpu_ms[:tenth], 50)), 4) if n else None,
            round(float(np.percentile(gpu_ms[-tenth:], 50)), 4) if n else None,
        ],
        "clocks": {"gpu": "CUDA events around each replay", "wall": "perf_counter_ns around replay + synchronise"},
        "nvml": summarise(sampler.samples, start - t0, end - t0),
        "nvml_limits": nvml_limits(index),
        "monitor": {
            "max_temperature_c": LIMIT_TEMPERATURE_C,
            "faults": faults,
            "error": monitor_error,
        },
    }
    (out / "gpu_load.json").write_text(
        json.dumps(
            {
                "bucket": bucket,
                "t0_note": "t_s is seconds since sampling began; the load ran from load_start_s to load_end_s",
                "load_start_s": round(start - t0, 3),
                "load_end_s": round(end - t0, 3),
                "limits": {"temperature_c": LIMIT_TEMPERATURE_C, "utilization_pct": LIMIT_UTILIZATION_PCT},
                "nvml": sampler.samples,
                "latency_per_second": per_second,
                "summary": summary,
            },
            indent=1,
            default=str,
        )
    )
    return summary


def plot(src: Path, png: Path, title: str | None = None) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = json.loads(src.read_text())
    ok = [s for s in data["nvml"] if "error" not in s]
    t = [s["t_s"] for s in ok]
    lim = data["limits"]
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)

    def shade(ax: Any) -> None:
        ax.axvspan(data["load_start_s"], data["load_end_s"], color="0.92", zorder=0)
        ax.grid(alpha=0.3)

    ax = axes[0]
    ax.plot(t, [s.get("temperature_c") for s in ok], "-o", ms=2, color="tab:red", label="GPU temperature")
    ax.axhline(lim["temperature_c"], color="tab:red", ls="--", lw=1, label=f"guide limit {lim['temperature_c']} °C")
    ax.set_ylabel("°C")
    ax.legend(loc="lower right", fontsize=8)
    shade(ax)

    ax = axes[1]
    ax.plot(t, [s.get("utilization_pct") for s in ok], "-o", ms=2, label="GPU utilisation")
    ax.plot(t, [s.get("memory_utilization_pct") for s in ok], "-", lw=1, label="memory utilisation")
    ax.axhline(lim["utilization_pct"], color="tab:blue", ls="--", lw=1, label=f"guide limit {lim['utilization_pct']} %")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 105)
    ax.legend(loc="lower right", fontsize=8)
    shade(ax)

    ax = axes[2]
    ax.plot(t, [s.get("sm_clock_mhz") for s in ok], "-o", ms=2, label="SM clock")
    ax.plot(t, [s.get("mem_clock_mhz") for s in ok], "-", lw=1, label="memory clock")
    ax.set_ylabel("MHz")
    ax.legend(loc="lower right", fontsize=8)
    shade(ax)

    ax = axes[3]
    ax.plot(t, [s.get("power_w") for s in ok], "-o", ms=2, color="tab:green", label="power")
    ax.set_ylabel("W")
    throttled = [s["t_s"] for s in ok if set(s.get("throttle_reasons") or []) - {"gpu_idle"}]
    if throttled:
        ax.plot(throttled, [0] * len(throttled), "|", color="k", ms=12, label="throttle reason other than idle")
    ax.legend(loc="lower right", fontsize=8)
    shade(ax)

    ax = axes[4]
    ps = data["latency_per_second"]
    ax.plot([p["t_s"] + 0.5 for p in ps], [p["gpu_p50_ms"] for p in ps], "-", label="GPU time p50 (CUDA events)")
    ax.plot([p["t_s"] + 0.5 for p in ps], [p["gpu_p99_ms"] for p in ps], "-", label="GPU time p99")
    ax.plot([p["t_s"] + 0.5 for p in ps], [p["wall_p99_ms"] for p in ps], ":", label="wall p99 (replay + sync)")
    ax.set_ylabel("ms per replay")
    ax.set_xlabel("seconds (grey: back-to-back load)")
    ax.legend(loc="upper right", fontsize=8)
    shade(ax)

    s = data["summary"]
    nv = summarise(data["nvml"], data.get("load_start_s"), data.get("load_end_s"))
    reasons = ", ".join(f"{k} {v} s" for k, v in nv["throttle_reasons_seconds"].items()) or "none read"
    ecc = nv.get("ecc", {})
    ecc_txt = ", ".join(f"{k.removeprefix('ecc_')} {v['first']}→{v['last']}" for k, v in ecc.items())
    fig.suptitle(
        (title or f"Sustained load: bucket {data['bucket']}, {s['replays']} replays in {s['seconds']} s")
        + f"\nthrottle reasons during load: {reasons}\nECC: {ecc_txt}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="draw gpu_load.json to a PNG")
    p.add_argument("src", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--title")
    args = parser.parse_args()
    plot(args.src, args.png, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
