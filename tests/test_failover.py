"""Engine failover: the policy (pure), the engine set with two real ONNX Runtime engines and
the fault injector, and the daemon over loopback: for each fault kind the switch happens within
the batch that showed it, that batch's signals still reach the gates, and the journal, the
metric and `tradingd status` all say so. Failback is an operator's command."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.journal import read_journal
from daemon.admin import request
from daemon.config import EngineConfig, EnginesConfig, FailoverConfig, InjectConfig, MetricsConfig, SignalConfig
from daemon.engineset import EngineSet
from engines.base import EngineSpec
from engines.chooser import DEFAULT_MODEL
from engines.inject import FaultInjectingEngine, Injection
from engines.onnxruntime import OnnxRuntimeEngine
from risk.failover import FailoverPolicy, FailoverReason
from tests.helpers import Rig, running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

SYMBOLS = ("AAA", "BBB", "CCC")
MS = 1_000_000


# -- the policy -------------------------------------------------------------------------------


def test_policy_fails_over_on_the_kth_late_batch_of_the_last_n() -> None:
    policy = FailoverPolicy(budget_ns=5 * MS, misses=2, window=3)
    assert policy.observe(6 * MS) is None  # late, 1 of 1
    assert policy.observe(1 * MS) is None
    assert policy.observe(1 * MS) is None  # the late one is still in the last 3
    assert policy.observe(1 * MS) is None  # now it has left the window
    assert policy.observe(9 * MS) is None
    verdict = policy.observe(7 * MS)
    assert verdict is not None and verdict.reason is FailoverReason.DEADLINE
    assert "2 of the last 3" in verdict.detail and "5000 us" in verdict.detail


def test_policy_fails_over_at_once_on_an_exception_or_non_finite_logits() -> None:
    policy = FailoverPolicy(budget_ns=5 * MS, misses=3, window=20)
    raised = policy.observe(1 * MS, raised="InferenceError: boom")
    assert raised is not None and raised.reason is FailoverReason.EXCEPTION and "boom" in raised.detail
    nonfinite = policy.observe(1 * MS, finite=False)
    assert nonfinite is not None and nonfinite.reason is FailoverReason.NONFINITE


def test_policy_refuses_more_misses_than_its_window() -> None:
    with pytest.raises(ValueError, match="misses <= window"):
        FailoverPolicy(budget_ns=1, misses=5, window=4)


@given(
    late=st.lists(st.booleans(), min_size=1, max_size=60),
    window=st.integers(1, 10),
    data=st.data(),
)
def test_policy_deadline_verdict_comes_exactly_when_k_of_the_last_n_are_late(
    late: list[bool], window: int, data: st.DataObject
) -> None:
    misses = data.draw(st.integers(1, window))
    policy = FailoverPolicy(budget_ns=100, misses=misses, window=window)
    expected = next((i for i in range(len(late)) if sum(late[max(0, i - window + 1) : i + 1]) >= misses), None)
    got = None
    for i, is_late in enumerate(late):
        if policy.observe(200 if is_late else 50) is not None:
            got = i
            break
    assert got == expected


# -- the engine set with real engines ------------------------------------------------------------


def _engine(name: str) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(EngineSpec(name, "onnxruntime", DEFAULT_MODEL, batch_buckets=(1, 8)))


def _batch(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, 16, 6)).astype(np.float32)


@pytest.mark.parametrize(("kind", "reason"), [("exception", "exception"), ("nan", "nonfinite")])
def test_a_faulted_batch_is_rerun_on_the_standby_within_the_same_call(kind: str, reason: str) -> None:
    primary = FaultInjectingEngine(_engine("primary"), Injection(kind, after_batches=1))
    standby = _engine("standby")
    engines = EngineSet(primary, standby, FailoverPolicy(5 * MS, 3, 20), lambda: 0)
    batch = _batch(5)
    expected = OnnxRuntimeEngine(EngineSpec("ref", "onnxruntime", DEFAULT_MODEL, batch_buckets=(8,)))
    buf = expected.input_buffer(8)
    buf[:5] = batch
    reference = expected.infer(8)[:5].copy()

    for attempt in range(2):  # the first batch runs clean, the second is faulted
        engine, bucket, buf = engines.input_buffer(5)
        assert engine is primary
        buf[:5] = batch
        outcome = engines.run(engine, bucket, 5)
        if attempt == 0:
            assert outcome.event is None and outcome.engine == "primary"
    assert outcome.event is not None
    assert outcome.event.reason == reason and outcome.event.rerun
    assert outcome.engine == "standby"
    np.testing.assert_allclose(outcome.logits[:5], reference, rtol=1e-5, atol=1e-5)
    assert engines.input_buffer(5)[0] is standby


def test_a_late_batch_keeps_its_logits_and_the_next_batch_goes_to_the_standby() -> None:
    primary = FaultInjectingEngine(_engine("primary"), Injection("latency", latency_ms=30))
    standby = _engine("standby")
    engines = EngineSet(primary, standby, FailoverPolicy(10 * MS, 1, 1), time.monotonic_ns)
    engine, bucket, buf = engines.input_buffer(3)
    buf[:3] = _batch(3)
    outcome = engines.run(engine, bucket, 3)
    assert outcome.engine == "primary" and outcome.elapsed_ns > 10 * MS
    assert outcome.event is not None and outcome.event.reason == "deadline" and not outcome.event.rerun
    assert np.isfinite(outcome.logits[:3]).all()
    assert engines.input_buffer(3)[0] is standby


def test_a_standby_fault_is_raised_not_swallowed() -> None:
    standby = FaultInjectingEngine(_engine("standby"), Injection("exception"))
    engines = EngineSet(None, standby, FailoverPolicy(5 * MS, 3, 20), lambda: 0, primary_error="no GPU")
    engine, bucket, _ = engines.input_buffer(1)
    with pytest.raises(Exception, match="injected fault"):
        engines.run(engine, bucket, 1)
    with pytest.raises(LookupError, match="no GPU"):
        engines.switch("primary", FailoverReason.OPERATOR, "test")


# -- the daemon -------------------------------------------------------------------------------


async def _ask(rig: Rig, **message: Any) -> dict[str, Any]:
    return await asyncio.to_thread(request, str(rig.daemon.config.admin.socket), message)


def _scrape(rig: Rig) -> str:
    port = rig.daemon.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _failover_rig(tmp: Path, inject: InjectConfig, failover: FailoverConfig | None = None) -> Any:
    engines = EnginesConfig(
        primary=EngineConfig(inject=inject),
        standby=EngineConfig(),
        failover=failover or FailoverConfig(),
    )
    return running_rig(
        tmp,
        SYMBOLS,
        engine=engines,
        metrics=MetricsConfig(port=0),
        signal=SignalConfig(confidence_threshold=0.0),
    )


@pytest.mark.parametrize(
    ("inject", "failover", "reason", "rerun"),
    [
        (InjectConfig(kind="exception", after_batches=2), None, "exception", True),
        (InjectConfig(kind="nan", after_batches=2), None, "nonfinite", True),
        (
            InjectConfig(kind="latency", after_batches=2, latency_ms=60),
            FailoverConfig(budget_us=40_000, misses=1, window=5),
            "deadline",
            False,
        ),
    ],
)
async def test_each_fault_fails_over_within_its_batch_and_loses_no_signal(
    tmp_path: Path, inject: InjectConfig, failover: FailoverConfig | None, reason: str, rerun: bool
) -> None:
    minutes = WINDOW + 5
    async with _failover_rig(tmp_path, inject, failover) as rig:
        await _send_minutes(rig, SYMBOLS, range(minutes))
        stats = rig.daemon.stats
        await wait_for(lambda: stats.minute_ends == minutes and rig.daemon.runtime.idle_event.is_set(), timeout=20)
        # Every row of every batch became a signal that reached the gates; none failed or was lost.
        assert stats.batches >= 5 and stats.batch_rows == len(SYMBOLS) * stats.batches
        assert sum(stats.signals.values()) == stats.batch_rows
        assert stats.infer_failures == 0 and stats.infer_nonfinite == 0
        assert stats.intents > 0
        assert dict(stats.failovers) == {reason: 1}
        assert stats.rerun_batches == int(rerun)

        status = (await _ask(rig, cmd="status"))["result"]["engine"]
        assert status["active"] == "standby" and status["failovers"] == 1
        assert status["last_failover"]["reason"] == reason
        assert status["primary"]["loaded"] and "injecting" in status["primary"]["detail"]
        metrics = await asyncio.to_thread(_scrape, rig)
        assert f'tradingd_failovers_total{{reason="{reason}"}} 1.0' in metrics
        assert 'tradingd_active_engine{engine="standby"} 1.0' in metrics
        assert 'tradingd_active_engine{engine="primary"} 0.0' in metrics
        # The fault struck the third batch: it is the one that switched.
        assert rig.daemon.engines is not None
        primary = rig.daemon.engines.primary
        assert isinstance(primary, FaultInjectingEngine) and primary.calls == 3 and primary.injected == 1

    switches = [r for r in read_journal(tmp_path / "journal.msgpack") if r["kind"] == "failover"]
    assert len(switches) == 1
    (s,) = switches
    assert (s["from"], s["to"], s["reason"], s["rerun"], s["rows"]) == ("primary", "standby", reason, rerun, 3)


async def test_operator_fails_back_and_a_restart_keeps_the_engine_the_journal_says(tmp_path: Path) -> None:
    inject = InjectConfig(kind="exception", after_batches=0, batches=1)
    async with _failover_rig(tmp_path, inject) as rig:
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 1))
        await wait_for(lambda: sum(rig.daemon.stats.failovers.values()) == 1, what="failover")
        bad = await _ask(rig, cmd="failover", to="sideways")
        assert not bad["ok"] and "primary" in bad["error"]
    # Restarted with the same journal: still on the standby, until an operator says otherwise.
    async with _failover_rig(tmp_path / ".", InjectConfig(kind="latency", after_batches=10**9)) as rig:
        engines = rig.daemon.engines
        assert engines is not None and engines.active is engines.standby
        back = await _ask(rig, cmd="failover", to="primary")
        assert back == {"ok": True, "result": {"active": "primary", "changed": True}}
        again = await _ask(rig, cmd="failover", to="primary")
        assert again["result"]["changed"] is False
        assert (await _ask(rig, cmd="status"))["result"]["engine"]["active"] == "primary"
        assert engines.primary is not None
        before = engines.primary.health().inferences
        # Feature windows start empty after a restart: a full window, then three batches.
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 1, 2 * WINDOW + 3))
        await wait_for(lambda: rig.daemon.stats.batches >= 3, what="batches after failback")
        assert engines.primary.health().inferences >= before + 3
    records = list(read_journal(tmp_path / "journal.msgpack"))
    switches = [(r["to"], r["reason"], r.get("uid")) for r in records if r["kind"] == "failover"]
    assert switches == [("standby", "exception", None), ("primary", "operator", os.getuid())]


# -- GPU health faults ----------------------------------------------------------------------------


def test_gpu_health_faults_name_what_is_wrong_and_a_healthy_gpu_has_none() -> None:
    from engines.gpu_health import GpuHealth, faults  # noqa: PLC0415

    healthy = GpuHealth(0, "NVIDIA H200", "580.159.04", temperature_c=41, ecc_enabled=True, ecc_volatile_uncorrected=0)
    assert faults(healthy, max_temperature_c=87) == []
    hot = GpuHealth(0, "g", "d", temperature_c=90)
    assert faults(hot, 87) == ["temperature 90 C >= 87 C"]
    broken = GpuHealth(0, "g", "d", ecc_volatile_uncorrected=2, remap_failed=True, xid_events=[79])
    assert faults(broken, 87) == ["2 uncorrected ECC errors since boot", "row remapping failed", "Xid 79"]
    slow = GpuHealth(0, "g", "d", throttle_reasons=["hw_thermal_slowdown"])
    assert faults(slow, 87) == ["hardware slowdown (hw_thermal_slowdown)"]
    idle = GpuHealth(0, "g", "d", throttle_reasons=["gpu_idle", "sw_power_cap"])
    assert faults(idle, 87) == []


async def test_a_gpu_health_fault_fails_the_primary_over_once(tmp_path: Path) -> None:
    async with _failover_rig(tmp_path, InjectConfig(kind="latency", after_batches=10**9)) as rig:
        rig.daemon.on_gpu_fault("Xid 79")
        rig.daemon.on_gpu_fault("Xid 79")  # already on the standby: nothing more happens
        assert rig.daemon.engines is not None and rig.daemon.engines.active is rig.daemon.engines.standby
        assert dict(rig.daemon.stats.failovers) == {"gpu_health": 1}
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 1))
        await wait_for(lambda: rig.daemon.stats.batches >= 1, what="a batch on the standby")
        assert rig.daemon.engines.standby is not None
        assert rig.daemon.engines.standby.health().inferences > len(rig.daemon.engines.standby.buckets)
    (record,) = [r for r in read_journal(tmp_path / "journal.msgpack") if r["kind"] == "failover"]
    assert (record["reason"], record["detail"]) == ("gpu_health", "Xid 79")
