"""GPU health through NVML (``pynvml`` from nvidia-ml-py): readings, faults and Xid events.

``read_health`` takes one snapshot: temperature, utilisation, memory, clocks, power, ECC mode,
volatile and aggregate ECC error counts, remapped rows, clock throttle reasons. A reading the
GPU does not support is ``None``, never an error. ``faults`` says what in a snapshot should
fail the primary over. ``GpuMonitor`` polls on its own thread and waits for Xid events on
another, calling back on a fault.

Ran on a GPU: see ``bench/RESULTS.md`` (GPU check) for where and with what result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from types import ModuleType
from typing import Any

import structlog

from engines.errors import BackendUnavailableError

log = structlog.get_logger("tradingd.gpu")


def _nvml() -> ModuleType:
    try:
        import pynvml  # noqa: PLC0415 - GPU path only
    except ImportError as exc:
        raise BackendUnavailableError(f"nvidia-ml-py is not installed ({exc}): no GPU health readings") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise BackendUnavailableError(f"NVML cannot start ({exc}): no NVIDIA driver or no GPU") from exc
    module: ModuleType = pynvml
    return module


@dataclass(slots=True)
class GpuHealth:
    index: int
    name: str
    driver: str
    temperature_c: int | None = None
    utilization_pct: int | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    power_w: float | None = None
    ecc_enabled: bool | None = None
    ecc_volatile_uncorrected: int | None = None
    ecc_volatile_corrected: int | None = None
    ecc_aggregate_uncorrected: int | None = None
    ecc_aggregate_corrected: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    throttle_reasons: list[str] = field(default_factory=list)
    xid_events: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Throttle reasons that mean the GPU is protecting itself, as opposed to idling.
_THROTTLE_NAMES = {
    "nvmlClocksThrottleReasonGpuIdle": "gpu_idle",
    "nvmlClocksThrottleReasonApplicationsClocksSetting": "applications_clocks",
    "nvmlClocksThrottleReasonSwPowerCap": "sw_power_cap",
    "nvmlClocksThrottleReasonHwSlowdown": "hw_slowdown",
    "nvmlClocksThrottleReasonSyncBoost": "sync_boost",
    "nvmlClocksThrottleReasonSwThermalSlowdown": "sw_thermal_slowdown",
    "nvmlClocksThrottleReasonHwThermalSlowdown": "hw_thermal_slowdown",
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": "hw_power_brake",
    "nvmlClocksThrottleReasonDisplayClockSetting": "display_clock",
}


def _try(fn: Callable[[], Any]) -> Any:
    import pynvml  # noqa: PLC0415

    try:
        return fn()
    except pynvml.NVMLError:
        return None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_health(index: int = 0) -> GpuHealth:
    """One snapshot of GPU ``index``; raises BackendUnavailableError where NVML cannot start."""
    nv = _nvml()
    h = nv.nvmlDeviceGetHandleByIndex(index)
    g = GpuHealth(index, _text(nv.nvmlDeviceGetName(h)), _text(nv.nvmlSystemGetDriverVersion()))
    g.temperature_c = _try(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
    util = _try(lambda: nv.nvmlDeviceGetUtilizationRates(h))
    g.utilization_pct = util.gpu if util is not None else None
    mem = _try(lambda: nv.nvmlDeviceGetMemoryInfo(h))
    if mem is not None:
        g.memory_used_bytes, g.memory_total_bytes = int(mem.used), int(mem.total)
    g.sm_clock_mhz = _try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
    g.mem_clock_mhz = _try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM))
    mw = _try(lambda: nv.nvmlDeviceGetPowerUsage(h))
    g.power_w = mw / 1000 if mw is not None else None
    mode = _try(lambda: nv.nvmlDeviceGetEccMode(h))
    g.ecc_enabled = bool(mode[0]) if mode is not None else None
    if g.ecc_enabled:
        for attr, etype, counter in (
            ("ecc_volatile_uncorrected", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC),
            ("ecc_volatile_corrected", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_VOLATILE_ECC),
            ("ecc_aggregate_uncorrected", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_AGGREGATE_ECC),
            ("ecc_aggregate_corrected", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_AGGREGATE_ECC),
        ):
            setattr(g, attr, _try(partial(nv.nvmlDeviceGetTotalEccErrors, h, etype, counter)))
    rows = _try(lambda: nv.nvmlDeviceGetRemappedRows(h))
    if rows is not None:
        g.remapped_rows_correctable, g.remapped_rows_uncorrectable = int(rows[0]), int(rows[1])
        g.remap_pending, g.remap_failed = bool(rows[2]), bool(rows[3])
    reasons = _try(lambda: nv.nvmlDeviceGetCurrentClocksThrottleReasons(h))
    if reasons is not None:
        g.throttle_reasons = [
            label for name, label in _THROTTLE_NAMES.items() if hasattr(nv, name) and reasons & getattr(nv, name)
        ]
    return g


def faults(g: GpuHealth, max_temperature_c: int) -> list[str]:
    """What in this snapshot should fail the primary over (empty: healthy)."""
    out = []
    if g.ecc_volatile_uncorrected:
        out.append(f"{g.ecc_volatile_uncorrected} uncorrected ECC errors since boot")
    if g.temperature_c is not None and g.temperature_c >= max_temperature_c:
        out.append(f"temperature {g.temperature_c} C >= {max_temperature_c} C")
    if g.remap_failed:
        out.append("row remapping failed")
    if "hw_slowdown" in g.throttle_reasons or "hw_thermal_slowdown" in g.throttle_reasons:
        out.append(f"hardware slowdown ({', '.join(g.throttle_reasons)})")
    if g.xid_events:
        out.append(f"Xid {g.xid_events[-1]}")
    return out


class GpuMonitor:
    """Poll ``read_health`` every ``poll_s``; wait for Xid events; call ``on_fault(detail)`` once."""

    def __init__(self, index: int, poll_s: float, max_temperature_c: int, on_fault: Callable[[str], None]) -> None:
        self.index = index
        self.poll_s = poll_s
        self.max_temperature_c = max_temperature_c
        self.on_fault = on_fault
        self.latest: GpuHealth | None = read_health(index)
        self.faulted: str | None = None
        self.xids: list[int] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, name="tradingd-gpu-poll", daemon=True),
            threading.Thread(target=self._wait_xid, name="tradingd-gpu-xid", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _fault(self, detail: str) -> None:
        if self.faulted is None:
            self.faulted = detail
            log.error("gpu_fault", gpu=self.index, detail=detail)
            self.on_fault(detail)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                g = read_health(self.index)
            except Exception as exc:
                self._fault(f"NVML reading failed: {exc}")
                continue
            g.xid_events = list(self.xids)
            self.latest = g
            found = faults(g, self.max_temperature_c)
            if found:
                self._fault("; ".join(found))

    def _wait_xid(self) -> None:
        import pynvml as nv  # noqa: PLC0415

        try:
            handle = nv.nvmlDeviceGetHandleByIndex(self.index)
            events = nv.nvmlEventSetCreate()
            nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, events)
        except nv.NVMLError as exc:
            log.warning("gpu_xid_events_unavailable", gpu=self.index, error=str(exc))
            return
        try:
            while not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait_v2(events, 500)
                except nv.NVMLError_Timeout:
                    continue
                self.xids.append(int(data.eventData))
                self._fault(f"Xid {data.eventData}")
        except nv.NVMLError as exc:
            log.warning("gpu_xid_wait_failed", gpu=self.index, error=str(exc))
        finally:
            nv.nvmlEventSetFree(events)

    def close(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + 2
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
