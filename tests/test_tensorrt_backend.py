"""The TensorRT backend against the real lean TensorRT runtime and cuda-python, on a machine
without a GPU: every runtime call it makes exists with the signature used, and with no GPU it
fails with a clear error, never a traceback or a crash. Where a tensorrt primary cannot run, a
configured standby serves, and the journal, metrics and status say why."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import msgspec
import pytest

from broker.journal import read_journal
from daemon.config import EngineConfig, EnginesConfig, MetricsConfig
from daemon.errors import EX_UNAVAILABLE
from engines.chooser import DEFAULT_MODEL, resolve_model
from engines.cuda import CUDA_RUNTIME_API, DeviceFacts
from engines.errors import ManifestError, ModelMismatchError, PlanError
from engines.manifest import TensorRTBuild, encode_manifest, load_manifest, sha256_file
from engines.tensorrt import TENSORRT_RUNTIME_API, check_plan_compatible
from tests.helpers import running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

trt = pytest.importorskip("tensorrt_lean_bindings", reason="the lean TensorRT runtime (extra 'lean') is not installed")
cuda_rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (extra 'lean') is not installed")

ENGINES = Path(__file__).resolve().parent.parent / "engines"
H200 = DeviceFacts(0, "NVIDIA H200", "9.0", 141 << 30, 13000, 13030)


def _has_gpu() -> bool:
    err, count = cuda_rt.cudaGetDeviceCount()
    return err == cuda_rt.cudaError_t.cudaSuccess and count > 0


no_gpu_here = pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU; the no-GPU path is tested without one")


# -- the runtime API the backend uses ------------------------------------------------------------


def _split_params(text: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current.strip())
    return out


def _overloads(member: str, doc: str) -> list[list[tuple[str, bool]]]:
    """Each pybind11 signature of ``member`` in ``doc``: [(param name, has default)], self left out."""
    found = []
    for m in re.finditer(rf"(?:^|\n)(?:\d+\. )?{re.escape(member)}\((.*?)\) ->", doc):
        params = _split_params(m.group(1))[1:]  # drop self
        found.append([(p.split(":")[0].strip(), "=" in p) for p in params])
    return found


@pytest.mark.parametrize(("member", "used"), list(TENSORRT_RUNTIME_API.items()), ids=str)
def test_every_tensorrt_call_the_backend_makes_exists_with_that_signature(
    member: tuple[str, str], used: tuple[str, ...] | str
) -> None:
    cls_name, name = member
    cls = getattr(trt, cls_name)
    attr = inspect.getattr_static(cls, name)
    if used == "property":
        assert isinstance(attr, property), f"{cls_name}.{name} is not a property in this runtime"
        return
    if used == "enum":
        assert isinstance(attr, type) and hasattr(attr, "__members__"), f"{cls_name}.{name} is not an enum"
        return
    if used == "enum value":
        assert name in cls.Severity.__members__, f"{cls_name}.Severity has no {name}"
        return
    doc = getattr(cls, name).__doc__ or ""
    overloads = _overloads(name, doc)
    assert overloads, f"no signature found for {cls_name}.{name}"
    fits = [
        o
        for o in overloads
        if [p for p, _ in o[: len(used)]] == list(used) and all(default for _, default in o[len(used) :])
    ]
    assert fits, f"{cls_name}.{name}{used} matches none of {overloads}"


def test_the_backend_calls_nothing_of_tensorrt_outside_the_checked_table() -> None:
    members = {
        m for cls in ("Runtime", "ICudaEngine", "IExecutionContext", "ILogger") for m in dir(getattr(trt, cls))
    } - set(dir(object))
    # ``name`` is also what the backend reads off the manifest's tensor specs (``m.input.name``).
    members.discard("name")
    used = set()
    for node in ast.walk(ast.parse((ENGINES / "tensorrt.py").read_text())):
        if isinstance(node, ast.Attribute) and node.attr in members:
            used.add(node.attr)
    table = {name for _, name in TENSORRT_RUNTIME_API}
    assert used - table == set(), f"engines/tensorrt.py uses {sorted(used - table)} without checking them"


@pytest.mark.parametrize(("name", "params"), list(CUDA_RUNTIME_API.items()))
def test_every_cuda_runtime_call_exists_with_that_signature(name: str, params: tuple[str, ...]) -> None:
    assert tuple(inspect.signature(getattr(cuda_rt, name)).parameters) == params


def test_the_cuda_module_calls_nothing_outside_the_checked_table() -> None:
    used = {
        node.attr
        for node in ast.walk(ast.parse((ENGINES / "cuda.py").read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("cuda") and callable(getattr(cuda_rt, node.attr, 0))
    }
    used = {u for u in used if not isinstance(getattr(cuda_rt, u), type)}  # enums and types are not calls
    assert used - set(CUDA_RUNTIME_API) == set()


# -- no GPU: clear errors ------------------------------------------------------------------------


def _plan_beside_model(tmp: Path, build: TensorRTBuild | None, plan_bytes: bytes = b"plan") -> Path:
    (tmp / "model.onnx").write_bytes(DEFAULT_MODEL.read_bytes())
    plan = tmp / "model.plan"
    plan.write_bytes(plan_bytes)
    manifest = load_manifest(DEFAULT_MODEL)
    if build is not None:
        build = msgspec.structs.replace(build, plan_sha256=sha256_file(plan))
    (tmp / "model.manifest.json").write_bytes(encode_manifest(msgspec.structs.replace(manifest, tensorrt=build)))
    return plan


def _build(**override: object) -> TensorRTBuild:
    fields: dict[str, object] = {
        "version": trt.__version__,
        "compute_capability": "9.0",
        "version_compatible": True,
        "plan_file": "model.plan",
        "plan_sha256": "",
    }
    fields.update(override)
    return TensorRTBuild(**fields)  # type: ignore[arg-type]


@no_gpu_here
def test_without_a_gpu_the_engine_says_so_and_the_process_exits_cleanly(tmp_path: Path) -> None:
    plan = _plan_beside_model(tmp_path, _build())
    code = (
        "import sys\n"
        "from engines.base import EngineSpec\n"
        "from engines.cuda import NoGpuError\n"
        "from engines.tensorrt import TensorRTEngine\n"
        "try:\n"
        f"    TensorRTEngine(EngineSpec('primary', 'tensorrt', {str(plan)!r}))\n"
        "except NoGpuError as exc:\n"
        "    print('REFUSED', exc)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    # 3 is our exit; a crash in TensorRT would be -11 (SIGSEGV) with no line printed.
    assert result.returncode == 3, result.stderr
    assert "REFUSED no GPU: no NVIDIA driver is installed" in result.stdout
    assert "Traceback" not in result.stderr


@no_gpu_here
def test_run_with_a_tensorrt_primary_and_no_standby_exits_unavailable_naming_why(tmp_path: Path) -> None:
    config = tmp_path / "tradingd.toml"
    config.write_text(f"[engine.primary]\nbackend = 'tensorrt'\n[journal]\npath = '{tmp_path / 'j'}'\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EX_UNAVAILABLE
    assert "engine unavailable: no GPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_build_plan_without_full_tensorrt_says_what_is_missing_and_exits_nonzero(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        pytest.skip("full TensorRT is installed here")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "model", "build-plan", str(DEFAULT_MODEL), "--out", str(tmp_path / "m.plan")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EX_UNAVAILABLE
    assert "needs the full TensorRT package" in result.stderr
    assert "Only the lean runtime is installed here" in result.stderr
    assert not (tmp_path / "m.plan").exists()


def test_a_builtin_tensorrt_model_means_the_plan_beside_the_shipped_onnx() -> None:
    assert resolve_model("builtin", "tensorrt") == DEFAULT_MODEL.with_name("model.plan")
    assert resolve_model("builtin") == DEFAULT_MODEL


# -- plan checks before TensorRT is touched ------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "flavor", "runtime", "message"),
    [
        (_build(compute_capability="8.0"), "lean", "11.4.0", "built for compute capability 8.0"),
        (_build(version_compatible=False), "lean", "11.4.0", "runs only version-compatible plans"),
        (_build(version="11.6.0"), "full", "11.4.0", "newer than this runtime"),
        (_build(version="10.8.0", version_compatible=False), "full", "11.4.0", "plan built for TensorRT 10.8.0"),
    ],
)
def test_a_plan_this_runtime_or_gpu_cannot_run_is_refused_with_the_reason(
    build: TensorRTBuild, flavor: str, runtime: str, message: str
) -> None:
    manifest = msgspec.structs.replace(load_manifest(DEFAULT_MODEL), tensorrt=build)
    with pytest.raises(PlanError, match=message):
        check_plan_compatible(manifest, "model.plan", runtime, flavor, H200)


def test_a_compatible_plan_passes_the_checks() -> None:
    for build, flavor in ((_build(), "lean"), (_build(version_compatible=False, version="11.4.0"), "full")):
        manifest = msgspec.structs.replace(load_manifest(DEFAULT_MODEL), tensorrt=build)
        check_plan_compatible(manifest, "model.plan", "11.4.0", flavor, H200)


def test_a_plan_is_checked_against_its_own_hash_and_needs_a_build_record(tmp_path: Path) -> None:
    plan = _plan_beside_model(tmp_path, _build())
    assert load_manifest(plan).tensorrt is not None
    plan.write_bytes(b"another plan")
    with pytest.raises(ModelMismatchError, match=r"tensorrt\.plan_sha256"):
        load_manifest(plan)
    bare = _plan_beside_model(tmp_path / ".", None)
    with pytest.raises(ManifestError, match="no TensorRT build recorded"):
        load_manifest(bare)


def _scrape(port: int | None) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


# -- the daemon on the standby -------------------------------------------------------------------


@no_gpu_here
async def test_a_tensorrt_primary_without_a_gpu_leaves_the_standby_serving_and_says_why(tmp_path: Path) -> None:
    engines = EnginesConfig(primary=EngineConfig(backend="tensorrt"), standby=EngineConfig())
    symbols = ("AAA", "BBB")
    async with running_rig(tmp_path, symbols, engine=engines, metrics=MetricsConfig(port=0)) as rig:
        d = rig.daemon
        assert d.engines is not None and d.engines.primary is None
        status = d.engines.status()
        assert status["active"] == "standby"
        assert status["primary"] == {
            "loaded": False,
            "error": "no GPU: no NVIDIA driver is installed (libcuda.so.1 cannot be loaded)",
        }
        await _send_minutes(rig, symbols, range(WINDOW + 2))
        await wait_for(lambda: d.stats.batches >= 2, what="batches on the standby")
        assert sum(d.stats.signals.values()) == d.stats.batch_rows
        metrics = await asyncio.to_thread(_scrape, d.metrics_port)
        assert 'tradingd_failovers_total{reason="unavailable"} 1.0' in metrics
        assert 'tradingd_engine_loaded{engine="primary"} 0.0' in metrics
        assert 'tradingd_active_engine{engine="standby"} 1.0' in metrics
    (record,) = [r for r in read_journal(tmp_path / "journal.msgpack") if r["kind"] == "failover"]
    assert (record["to"], record["reason"]) == ("standby", "unavailable") and "no GPU" in record["detail"]
