"""What ships is what was tested: the hashed locks agree with pyproject.toml, CI and the README
install from them, the wheel carries the model and only the packages, it runs the demo from a
fresh venv, and the running build names itself (``--version``, the start-up log, the metrics)."""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon.cli import build_parser
from daemon.metrics import StatsCollector
from daemon.stats import Stats
from daemon.version import NOT_INSTALLED, BuildInfo, build_info, git_commit

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Each lock and the extras it was compiled with (README: CI and developers; deploy/README.md: the server).
LOCKS = {"ci.txt": ("dev", "export", "lean", "report"), "lean.txt": ("lean",)}
INSTALL = (
    "python3 -m venv .venv && .venv/bin/pip install --require-hashes -r requirements/ci.txt"
    " && .venv/bin/pip install --no-deps --no-build-isolation -e ."
)
COMMIT = re.compile(r"^([0-9a-f]{40}(-dirty)?|unknown)$")


@dataclass
class Pin:
    version: Version
    hashes: list[str]
    via: list[str]


def _lock(name: str) -> tuple[str, dict[str, Pin]]:
    """The lock's header and its pins by canonical name (pip-compile's output format)."""
    text = (ROOT / "requirements" / name).read_text()
    header = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            current = pins[canonicalize_name(m[1])] = Pin(Version(m[2]), [], [])
        elif current is not None and (h := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            current.hashes.append(h[1])
        elif current is not None and (v := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)) and v[1] != "via":
            current.via.append(v[1].strip())
    return header, pins


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize(("lock", "extras"), LOCKS.items())
def test_lock_when_compared_with_pyproject_pins_every_requirement_within_its_range(
    lock: str, extras: tuple[str, ...]
) -> None:
    _, pins = _lock(lock)
    for req in _requirements(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} has no pin for {req} (pyproject.toml): regenerate it (requirements/lock.sh)"
        assert req.specifier.contains(pins[name].version, prereleases=True), (
            f"{lock} pins {name}=={pins[name].version}, outside pyproject.toml's {req}: regenerate it"
        )


@pytest.mark.parametrize(("lock", "extras"), LOCKS.items())
def test_lock_when_compared_with_pyproject_names_exactly_its_requirements_as_direct(
    lock: str, extras: tuple[str, ...]
) -> None:
    """A requirement dropped from pyproject.toml, or added to it, shows as a lock out of date."""
    _, pins = _lock(lock)
    direct = {name for name, pin in pins.items() if "tradingd (pyproject.toml)" in pin.via}
    declared = {canonicalize_name(r.name) for r in _requirements(extras)}
    assert direct == declared, (
        f"{lock} is out of date with pyproject.toml (run requirements/lock.sh): "
        f"only in pyproject.toml {sorted(declared - direct)}, only in the lock {sorted(direct - declared)}"
    )


@pytest.mark.parametrize(("lock", "extras"), LOCKS.items())
def test_lock_header_names_pip_compile_with_hashes_and_the_flavours_extras(lock: str, extras: tuple[str, ...]) -> None:
    header, pins = _lock(lock)
    command = header.split("following command:", 1)[1]
    assert "pip-compile" in command and "--generate-hashes" in command and "--allow-unsafe" in command
    assert sorted(re.findall(r"--extra=(\S+)", command)) == sorted(extras)
    assert f"--output-file=requirements/{lock}" in command and command.strip("# \n").endswith("pyproject.toml")
    assert pins and all(pin.hashes for pin in pins.values()), "every pin needs a hash for --require-hashes"


def test_lean_lock_when_compared_with_the_ci_lock_pins_the_same_versions() -> None:
    """The server's environment is the one CI tested: every package the daemon deploys with is
    pinned at the version CI ran it at."""
    _, lean = _lock("lean.txt")
    _, ci = _lock("ci.txt")
    differ = {name: (str(pin.version), str(ci[name].version) if name in ci else None) for name, pin in lean.items()}
    assert {name: v for name, v in differ.items() if v[0] != v[1]} == {}


def test_lock_when_regenerated_uses_the_command_its_header_names() -> None:
    script = (ROOT / "requirements" / "lock.sh").read_text()
    for lock in LOCKS:
        header, _ = _lock(lock)
        command = " ".join(line.strip("# ") for line in header.split("following command:", 1)[1].splitlines())
        flags = [arg for arg in shlex.split(command) if arg.startswith("--")]
        assert all(flag in script for flag in flags), (lock, flags)


def test_ci_and_readme_when_installing_use_the_locked_set() -> None:
    """README's set-up command is one line, the same one .ci/run runs, and it installs from the lock."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert setup == [INSTALL, ".venv/bin/pytest"]
    assert INSTALL in ci and ".venv/bin/pytest" in ci


def test_deploy_readme_when_installing_uses_the_lean_lock_then_the_wheel_without_dependencies() -> None:
    deploy = (ROOT / "deploy" / "README.md").read_text()
    assert "--require-hashes -r $R/requirements/lean.txt" in deploy
    assert "pip install --no-deps $R/tradingd-" in deploy
    assert not re.search(r"pip install [^\n]*\[lean\]", deploy), "an unlocked install is left in deploy/README.md"


def _wheel(tmp_path: Path) -> Path:
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = out.glob("tradingd-*-py3-none-any.whl")
    return wheel


@pytest.mark.slow
def test_wheel_when_installed_in_a_fresh_venv_runs_the_demo_and_names_its_commit(tmp_path: Path) -> None:
    """``python -m build`` (the sdist, then the wheel from it) makes a wheel with the shipped model,
    the build's commit and none of bench/ or tests/; installed with --no-deps into a new venv it runs
    ``tradingd demo`` from outside the checkout. The dependencies are this venv's (the locked set in
    CI), reached through a .pth file, so the test needs no network."""
    before = git_commit(ROOT) or "unknown"
    wheel = _wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"daemon", "engines", "risk", "broker"}
    model = "engines/models/qwen-signal-v1/"
    assert {model + "model.onnx", model + "model.manifest.json", "daemon/_commit.txt"} <= set(names)
    commit = zipfile.ZipFile(wheel).read("daemon/_commit.txt").decode().strip()
    assert commit in {before, git_commit(ROOT) or "unknown"}  # another commit may land meanwhile

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "dependencies.pth").write_text("\n".join(paths) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr[-2000:]

    run = tmp_path / "elsewhere"
    run.mkdir()
    where = subprocess.run(
        [python, "-c", "import daemon, engines; print(daemon.__file__); print(engines.__file__)"],
        cwd=run,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(f).is_relative_to(venv) for f in where), where
    version = subprocess.run(
        [venv / "bin" / "tradingd", "--version"], cwd=run, capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[1].split() == ["commit", commit]
    demo = subprocess.run(
        [venv / "bin" / "tradingd", "demo", "--minutes", "20", "--symbols", "4", "--json", "--no-metrics"],
        cwd=run,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads(demo.stdout)
    assert summary["bars"]["received"] == 80 and summary["bars"]["balanced"] and summary["orders"]["balanced"]
    assert summary["engine"]["backend"] == "onnxruntime" and summary["batches"] > 0


def test_version_when_asked_prints_release_commit_and_runtime_versions() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"tradingd {importlib.metadata.version('tradingd')}"
    fields = dict(line.split(maxsplit=1) for line in lines[1:])
    assert list(fields) == ["commit", "onnxruntime", "numpy", "tensorrt", "cuda-bindings"]
    assert COMMIT.match(fields["commit"]), fields["commit"]
    assert fields["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert fields["numpy"] == importlib.metadata.version("numpy")
    assert fields["cuda-bindings"] in {importlib.metadata.version("cuda-bindings"), NOT_INSTALLED}
    assert fields["tensorrt"] == NOT_INSTALLED or re.match(r"^\S+ \((full|lean), tensorrt[-\w]*\)$", fields["tensorrt"])


def test_version_when_run_from_a_checkout_names_its_head_commit() -> None:
    if git_commit(ROOT) is None:
        pytest.skip("not a git checkout")
    assert build_info.__wrapped__().commit == git_commit(ROOT)


def test_build_info_when_scraped_is_one_series_labelled_with_the_build() -> None:
    registry = CollectorRegistry()
    registry.register(StatsCollector(Stats()))
    from prometheus_client import generate_latest  # noqa: PLC0415

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    (sample,) = families["tradingd_build_info"].samples
    assert sample.value == 1.0 and sample.labels == build_info().fields()
    assert set(sample.labels) == {f for f in BuildInfo.__dataclass_fields__}


def test_run_when_starting_logs_the_build_in_its_first_line(tmp_path: Path) -> None:
    """The start-up line ("config") carries the build; here the daemon then stops at a wrong
    model hash (exit 78), after logging it."""
    config = tmp_path / "tradingd.toml"
    config.write_text(
        f"[engine.primary]\nsha256 = '{'0' * 64}'\n[journal]\npath = '{tmp_path / 'j'}'\n"
        f"[metrics]\nenabled = false\n[admin]\nsocket = '{tmp_path / 'admin.sock'}'\n"
    )
    before = build_info.__wrapped__().fields()
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    after = build_info.__wrapped__().fields()
    assert result.returncode == 78, result.stderr
    first = json.loads(result.stderr.splitlines()[0])
    assert first["event"] == "config"
    logged = {k: first[k] for k in before}
    assert logged["commit"] in {before["commit"], after["commit"]}  # another commit may land meanwhile
    assert logged | {"commit": after["commit"]} == after


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _parsers(sub)
    return found


def test_help_when_printed_for_every_command_is_plain_text_with_a_description() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) > 15
    for parser in parsers:
        text = parser.format_help()
        assert "`" not in text and "::" not in text and ":class:" not in text, text
        assert parser.description, f"{parser.prog} --help has no description"
