"""Alert routing against the real tools: Debian's Alertmanager and amtool (fetched by
../shared/peers/alertmanager-tools.sh) and Debian's Prometheus. amtool checks the shipped
configuration and routes every alert rule by its severity; a real Prometheus scrapes a running
daemon and sends to a real Alertmanager on 127.0.0.1, a halt raised through the admin CLI
arrives as a page on a local webhook and as an email on a local SMTP sink, and the inhibition
rules hold back what a market halt and the kill switch make redundant."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

from daemon.config import MetricsConfig
from tests.helpers import running_rig, wait_for
from tests.test_prometheus import PROM, TOOLS_SCRIPT, _free_port, _get

ROOT = Path(__file__).resolve().parent.parent
AM_TOOLS_SCRIPT = ROOT.parent / "shared" / "peers" / "alertmanager-tools.sh"
AM = ROOT / "deploy" / "alertmanager"
SYMBOLS = ("AAA", "BBB")
# What the issue asks to page for: halts, the kill switch, failovers, the broker down, GPU
# faults and the daemon down.
PAGED = {
    "TradingdSymbolHalted",
    "TradingdMarketHalted",
    "TradingdKillSwitch",
    "TradingdFailover",
    "TradingdBrokerDisconnected",
    "TradingdGpuEccUncorrected",
    "TradingdDown",
}
# Debian builds Alertmanager to read its default templates from this folder, which exists only
# where the package is installed. A copy of the binary with the path rewritten, at the same
# length, to one relative to its working folder runs from the unpacked package, unchanged
# otherwise.
DEBIAN_SHARE = b"/usr/share/prometheus/alertmanager"
RELOCATED_SHARE = b"./" * 13 + b"am-share"


def _peer_tools(script: Path, what: str) -> Path:
    if not script.is_file():
        pytest.skip(f"{script} is absent: no {what} to test against")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        pytest.skip(f"{script.name} could not fetch {what}: {out.stderr.strip()[-500:]}")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def am_tools() -> Path:
    return _peer_tools(AM_TOOLS_SCRIPT, "Alertmanager or amtool")


@pytest.fixture(scope="module")
def prom_tools() -> Path:
    return _peer_tools(TOOLS_SCRIPT, "Prometheus")


@dataclass(frozen=True)
class Alertmanager:
    binary: Path
    cwd: Path


@pytest.fixture(scope="module")
def alertmanager(am_tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Alertmanager:
    original = am_tools / "prometheus-alertmanager"
    code = original.read_bytes()
    if DEBIAN_SHARE not in code:
        return Alertmanager(original, am_tools)
    assert len(RELOCATED_SHARE) == len(DEBIAN_SHARE)
    run = tmp_path_factory.mktemp("alertmanager")
    binary = run / "prometheus-alertmanager"
    binary.write_bytes(code.replace(DEBIAN_SHARE, RELOCATED_SHARE))
    binary.chmod(0o755)
    (run / "am-share").symlink_to(am_tools.parent / "share" / "prometheus" / "alertmanager")
    return Alertmanager(binary, run)


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM / "tradingd.rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_amtool_accepts_the_shipped_configuration(am_tools: Path) -> None:
    check = subprocess.run(
        [am_tools / "amtool", "check-config", AM / "alertmanager.yml"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "2 inhibit rules" in check.stdout and "2 receivers" in check.stdout and "1 templates" in check.stdout


def test_every_alert_rule_routes_critical_to_page_and_warning_to_email(am_tools: Path) -> None:
    rules = _rules()
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in rules}
    assert set(severity.values()) == {"critical", "warning"}
    assert {name for name, level in severity.items() if level == "critical"} >= PAGED
    # The SMS gateway texts the summary: with the instance, it fits in one 160-character SMS.
    assert all(len(rule["annotations"]["summary"]) <= 80 for rule in rules)
    for name, level in severity.items():
        routed = subprocess.run(
            [
                am_tools / "amtool",
                "config",
                "routes",
                "test",
                f"--config.file={AM / 'alertmanager.yml'}",
                f"--verify.receivers={'page' if level == 'critical' else 'email'}",
                f"alertname={name}",
                f"severity={level}",
                "instance=127.0.0.1:9108",
            ],
            capture_output=True,
            text=True,
        )
        assert routed.returncode == 0, (name, level, routed.stdout + routed.stderr)


def test_the_shipped_receivers_are_placeholders_to_fill_in() -> None:
    """Nothing real ships: every address is under example.invalid, and marked FILL IN."""
    text = (AM / "alertmanager.yml").read_text()
    config = yaml.safe_load(text)
    page, mail = (next(r for r in config["receivers"] if r["name"] == n) for n in ("page", "email"))
    hosts = [
        config["global"]["smtp_smarthost"].rsplit(":", 1)[0],
        config["global"]["smtp_from"].split("@")[1],
        urllib.parse.urlsplit(page["webhook_configs"][0]["url"]).hostname,
        *(c["to"].split("@")[1] for r in (page, mail) for c in r["email_configs"]),
    ]
    assert all(str(h).endswith("example.invalid") for h in hosts), hosts
    filled = [line for line in text.splitlines() if "example.invalid" in line and not line.lstrip().startswith("#")]
    assert all("FILL IN" in line for line in filled), filled


# The local receivers: a webhook standing in for the SMS gateway and an SMTP sink, on 127.0.0.1.


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class WebhookSink:
    """An HTTP/1.1 server on 127.0.0.1 that keeps every POST's JSON and answers 200."""

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                _, path, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.posts.append(Post(path, headers, json.loads(body)))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()

    def alerts(self, status: str) -> list[tuple[Post, dict[str, Any]]]:
        return [(p, a) for p in self.posts for a in p.body["alerts"] if a["status"] == status]

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class SmtpSink:
    """aiosmtpd's handler interface: keeps every message, delivers none."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((envelope, message))
        return "250 OK"

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for _, m in self.messages]


def _test_copy(tmp: Path, smtp_port: int, webhook_port: int) -> Path:
    """The shipped configuration with its receivers on 127.0.0.1 and its waits cut to a second."""
    config = yaml.safe_load((AM / "alertmanager.yml").read_text())
    config["global"].update(smtp_smarthost=f"127.0.0.1:{smtp_port}", smtp_require_tls=False)
    config["templates"] = [str(AM / "alertmanager_templates" / "*.tmpl")]
    token = tmp / "sms.token"
    token.write_text("sms-gateway-token\n")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{webhook_port}/sms"
            hook["http_config"]["authorization"]["credentials_file"] = str(token)
    for route in (config["route"], *config["route"]["routes"]):
        route.update(group_wait="1s", group_interval="1s")
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _prometheus_copy(tmp: Path, instance: str, am_port: int) -> Path:
    """The shipped Prometheus configuration, scraping and evaluating every second, sending to
    the test's Alertmanager."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    alertmanagers["static_configs"] = [{"targets": [f"127.0.0.1:{am_port}"]}]
    (scrape,) = config["scrape_configs"]
    scrape["static_configs"] = [{"targets": [instance]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def _process(argv: list[str], log: Path, cwd: Path | None = None) -> AsyncIterator[None]:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out, cwd=cwd)
        try:
            yield
        finally:
            process.terminate()
            await process.wait()


async def _until(check: Callable[[], Any], what: str, log: Path, timeout: float = 20.0) -> Any:
    """Polls a blocking ``check`` in a thread until it returns something true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(OSError):
            if found := await asyncio.to_thread(check):
                return found
        await asyncio.sleep(0.2)
    tail = (await asyncio.to_thread(log.read_text))[-1500:]
    raise AssertionError(f"timed out waiting for {what}; {log.name}: {tail}")


@pytest.mark.slow
async def test_a_halt_from_the_admin_cli_pages_by_webhook_and_email_through_the_real_alertmanager(
    tmp_path: Path, alertmanager: Alertmanager, prom_tools: Path
) -> None:
    """And a market halt holds back the symbol-halt alert, the kill switch holds back the
    market halt's, each pages once, and lifting them sends the resolved page."""
    hook, mail = WebhookSink(), SmtpSink()
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(lambda: SMTP(mail, hostname="127.0.0.1"), "127.0.0.1", 0)
    smtp_port = int(smtp.sockets[0].getsockname()[1])
    am_port, prom_port = _free_port(), _free_port()
    am_config = _test_copy(tmp_path, smtp_port, await hook.start())
    am_log, prom_log = tmp_path / "alertmanager.log", tmp_path / "prometheus.log"
    sock = str(tmp_path / "admin.sock")

    async def cli(*args: str) -> None:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "daemon", *args, "--socket", sock],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

    def am_alert(name: str) -> dict[str, Any] | None:
        reply = json.loads(_get(f"http://127.0.0.1:{am_port}/api/v2/alerts"))
        return next((a for a in reply if a["labels"]["alertname"] == name), None)

    def am_state(name: str, state: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            alert = am_alert(name)
            return alert if alert is not None and alert["status"]["state"] == state else None

        return check

    try:
        async with (
            _process(
                [
                    str(alertmanager.binary),
                    f"--config.file={am_config}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                am_log,
                cwd=alertmanager.cwd,
            ),
            running_rig(tmp_path, SYMBOLS, metrics=MetricsConfig(port=0)) as rig,
        ):
            await _until(lambda: _get(f"http://127.0.0.1:{am_port}/-/ready"), "Alertmanager ready", am_log)
            instance = f"127.0.0.1:{rig.daemon.metrics_port}"
            (tmp_path / "tradingd.rules.yml").write_text((PROM / "tradingd.rules.yml").read_text())
            prom_config = _prometheus_copy(tmp_path, instance, am_port)
            query = f"http://127.0.0.1:{prom_port}/api/v1/query?query=" + urllib.parse.quote('up{job="tradingd"} == 1')
            async with _process(
                [
                    str(prom_tools / "prometheus"),
                    f"--config.file={prom_config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                prom_log,
            ):
                await _until(lambda: json.loads(_get(query))["data"]["result"], "the first scrape", prom_log)

                await cli("halt", "AAA")
                await wait_for(lambda: bool(hook.alerts("firing")), timeout=20, what="the page")
                post, alert = hook.alerts("firing")[0]
                assert post.path == "/sms"
                assert post.headers["authorization"] == "Bearer sms-gateway-token"
                assert post.body["version"] == "4" and post.body["receiver"] == "page"
                assert post.body["status"] == "firing"
                assert post.body["groupLabels"] == {"alertname": "TradingdSymbolHalted", "instance": instance}
                assert alert["labels"] == {
                    "alertname": "TradingdSymbolHalted",
                    "instance": instance,
                    "job": "tradingd",
                    "severity": "critical",
                }
                assert alert["annotations"]["summary"] == "symbols halted"

                # The rig trades the unqualified shipped model, so a warning (TradingdModelUnqualified)
                # goes by email to the desk too; the page's email goes to the on-call list.
                def paged() -> list[Any]:
                    return [m for m in mail.messages if m[0].rcpt_tos == ["trading-oncall@example.invalid"]]

                await wait_for(lambda: bool(paged()), timeout=20, what="the email")
                envelope, message = paged()[0]
                assert envelope.mail_from == "tradingd-alerts@example.invalid"
                assert envelope.rcpt_tos == ["trading-oncall@example.invalid"]
                assert message["Subject"] == f"[FIRING] tradingd critical: TradingdSymbolHalted on {instance}"
                body = message.get_body(("plain",))
                assert body is not None
                text = body.get_content()
                assert f"FIRING TradingdSymbolHalted (critical) on {instance}" in text
                assert "symbols halted" in text and "tradingd resume lifts" in text

                # A market halt pages on its own, and holds back the symbol halt's alert.
                await cli("halt", "--all")
                await wait_for(
                    lambda: any(a["labels"]["alertname"] == "TradingdMarketHalted" for _, a in hook.alerts("firing")),
                    timeout=20,
                    what="the market halt's page",
                )
                held = await _until(am_state("TradingdSymbolHalted", "suppressed"), "the inhibition", am_log)
                market = await asyncio.to_thread(am_alert, "TradingdMarketHalted")
                assert market is not None and held["status"]["inhibitedBy"] == [market["fingerprint"]]

                # The kill switch pages, and holds back the market halt's alert.
                await cli("kill")
                await wait_for(
                    lambda: any(a["labels"]["alertname"] == "TradingdKillSwitch" for _, a in hook.alerts("firing")),
                    timeout=20,
                    what="the kill switch's page",
                )
                await _until(am_state("TradingdMarketHalted", "suppressed"), "the kill switch's inhibition", am_log)

                # Lifting the market halt and the kill switch resolves their pages; AAA stays halted.
                await cli("resume", "--all")
                await wait_for(
                    lambda: any(a["labels"]["alertname"] == "TradingdKillSwitch" for _, a in hook.alerts("resolved")),
                    timeout=20,
                    what="the kill switch's resolved page",
                )
                await _until(am_state("TradingdSymbolHalted", "active"), "the symbol halt active again", am_log)

        # Each halt paged once: no repeat, and none again when an inhibition was lifted.
        paged = [a["labels"]["alertname"] for _, a in hook.alerts("firing")]
        for name in ("TradingdSymbolHalted", "TradingdMarketHalted", "TradingdKillSwitch"):
            assert paged.count(name) == 1, paged
        assert "[FIRING] tradingd critical: TradingdKillSwitch on " + instance in mail.subjects()
    finally:
        await hook.close()
        smtp.close()
        await smtp.wait_closed()
