"""Metrics, alert rules and the dashboard against the real tools: Debian's promtool and
Prometheus server (fetched by ../shared/peers/prometheus-tools.sh). promtool lints a real scrape
of a running daemon and unit-tests every alert rule; a real Prometheus on 127.0.0.1 scrapes a
running daemon fed minute bars, and every dashboard panel's query returns data through its
HTTP API."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import MetricsConfig, SignalConfig
from tests.helpers import running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

ROOT = Path(__file__).resolve().parent.parent
TOOLS_SCRIPT = ROOT.parent / "shared" / "peers" / "prometheus-tools.sh"
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tradingd.json"
SYMBOLS = ("AAA", "BBB", "CCC", "DDD")


@pytest.fixture(scope="module")
def tools() -> Path:
    if not TOOLS_SCRIPT.is_file():
        pytest.skip(f"{TOOLS_SCRIPT} is absent: no promtool or Prometheus to test against")
    out = subprocess.run(["bash", str(TOOLS_SCRIPT)], capture_output=True, text=True, timeout=600, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_promtool_checks_and_unit_tests_the_alert_rules(tools: Path) -> None:
    check = subprocess.run(
        [tools / "promtool", "check", "rules", PROM / "tradingd.rules.yml"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    config = subprocess.run(
        [tools / "promtool", "check", "config", PROM / "prometheus.yml"], capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr
    tested = subprocess.run(
        [tools / "promtool", "test", "rules", PROM / "tradingd.rules.test.yml"], capture_output=True, text=True
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_rule_has_a_firing_and_a_quiet_test() -> None:
    import yaml  # noqa: PLC0415 - comes with the dev tools (via pre-installed deps)

    rules = {
        r["alert"] for g in yaml.safe_load((PROM / "tradingd.rules.yml").read_text())["groups"] for r in g["rules"]
    }
    tests = yaml.safe_load((PROM / "tradingd.rules.test.yml").read_text())["tests"]
    fired = {t["alert_rule_test"][0]["alertname"] for t in tests if t["alert_rule_test"][0]["exp_alerts"]}
    quiet = {t["alert_rule_test"][0]["alertname"] for t in tests if not t["alert_rule_test"][0]["exp_alerts"]}
    assert rules == fired == quiet
    wanted = {
        "TradingdDown",
        "TradingdTickToOrderP99High",
        "TradingdInferenceP99OverBudget",
        "TradingdFailover",
        "TradingdInconsistentExecReport",
        "TradingdSymbolHalted",
        "TradingdMarketHalted",
        "TradingdKillSwitch",
        "TradingdReviewWaiting",
        "TradingdFeedSilent",
        "TradingdFeedGapping",
        "TradingdBrokerDisconnected",
        "TradingdGpuHot",
        "TradingdGpuBusy",
        "TradingdGpuEccUncorrected",
        "TradingdSignalAccuracyLow",
        "TradingdModelUnqualified",
    }
    assert rules == wanted


async def test_promtool_finds_nothing_wrong_with_a_real_scrape(tmp_path: Path, tools: Path) -> None:
    async with running_rig(
        tmp_path, SYMBOLS, metrics=MetricsConfig(port=0), signal=SignalConfig(confidence_threshold=0.0)
    ) as rig:
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 4))
        await wait_for(lambda: rig.daemon.stats.orders_sent > 0, what="orders")
        scrape = await asyncio.to_thread(_get, f"http://127.0.0.1:{rig.daemon.metrics_port}/metrics")
    lint = await asyncio.to_thread(
        subprocess.run, [tools / "promtool", "check", "metrics"], input=scrape, capture_output=True, text=True
    )
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr
    # Label values are bound at start: every rejection and denial reason is there at zero.
    assert 'tradingd_bar_rejections_total{reason="non_finite"} 0.0' in scrape
    assert 'tradingd_failovers_total{reason="gpu_health"} 0.0' in scrape
    assert "tradingd_feed_wait_seconds_bucket" in scrape and "tradingd_send_seconds_bucket" in scrape


def _panel_targets() -> Iterator[tuple[str, bool, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        gpu = "NVML" in panel.get("description", "")
        for target in panel["targets"]:
            yield panel["title"], gpu, target["expr"]


def test_the_dashboard_covers_latency_throughput_orders_halts_reviews_engines_and_gpu() -> None:
    titles = " ".join(t for t, _, _ in _panel_targets()).lower()
    for word in ("tick-to-order", "stage", "heatmap", "bars per second", "orders", "halted", "review", "engine", "gpu"):
        assert word in titles, word
    kinds = {p["type"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert "heatmap" in kinds


async def test_prometheus_scrapes_a_running_daemon_and_every_panel_query_returns_data(
    tmp_path: Path, tools: Path
) -> None:
    async with running_rig(
        tmp_path, SYMBOLS, metrics=MetricsConfig(port=0), signal=SignalConfig(confidence_threshold=0.0)
    ) as rig:
        prom_port = _free_port()
        config = tmp_path / "prometheus.yml"
        rules = tmp_path / "tradingd.rules.yml"
        rules.write_text((PROM / "tradingd.rules.yml").read_text())
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n  - tradingd.rules.yml\n"
            "scrape_configs:\n  - job_name: tradingd\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{rig.daemon.metrics_port}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        server = await asyncio.create_subprocess_exec(
            str(tools / "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            stdout=log,
            stderr=log,
        )
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def query(expr: str) -> dict[str, Any]:
            reply: dict[str, Any] = json.loads(_get(f"{api}/query?{urllib.parse.urlencode({'query': expr})}"))
            return reply

        async def has(expr: str) -> bool:
            try:
                reply = await asyncio.to_thread(query, expr)
            except OSError:
                return False
            return reply.get("status") == "success" and bool(reply["data"]["result"])

        async def until(expr: str) -> None:
            for _ in range(120):
                if await has(expr):
                    return
                await asyncio.sleep(0.25)
            raise AssertionError(f"{expr}: no data; {(tmp_path / 'prometheus.log').read_text()[-1500:]}")

        try:
            await until('up{job="tradingd"} == 1')
            # Minutes arrive over several scrapes, so rates and increases have points to work on.
            seq, step = 0, (WINDOW + 4) // 2
            for chunk in range(8):
                seq = await _send_minutes(rig, SYMBOLS, range(chunk * step, (chunk + 1) * step), seq)
                await asyncio.sleep(0.8)
            await wait_for(lambda: rig.daemon.stats.orders_sent > 0, what="orders")
            await until("rate(tradingd_orders_total[1m]) > 0")
            empty = []
            for title, gpu, expr in _panel_targets():
                reply = await asyncio.to_thread(query, expr)
                assert reply["status"] == "success", (title, expr, reply)
                if gpu:
                    # No GPU here: NVML metrics are absent, and the query says so without error.
                    assert reply["data"]["result"] == [], (title, expr)
                elif not reply["data"]["result"]:
                    empty.append((title, expr))
            assert empty == [], f"dashboard queries with no data: {empty}"
            rules_reply = json.loads(await asyncio.to_thread(_get, f"{api}/rules"))
            loaded = {r["name"] for g in rules_reply["data"]["groups"] for r in g["rules"]}
            assert "TradingdTickToOrderP99High" in loaded and "TradingdFailover" in loaded
        finally:
            server.terminate()
            await server.wait()
            log.close()
