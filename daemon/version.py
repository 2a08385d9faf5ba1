"""Which build is running: the release, the commit it was built from, and the versions of the
runtime libraries that decide what the daemon computes (ONNX Runtime, numpy, the TensorRT
runtime, cuda-bindings).

The commit is written into the wheel when it is built (``setup.py`` puts ``daemon/_commit.txt``
into the build, from ``git`` or, for a wheel built from an sdist, from the sdist's copy). Run
from a git checkout (an editable install), the checkout's own commit is asked of ``git``;
neither known, it is ``"unknown"``. ``-dirty`` after the commit means tracked files differed
from it.

Library versions are read from the installed distributions' metadata, without importing them
(importing TensorRT or CUDA would touch the GPU). This module imports only the standard
library, so ``setup.py`` can load it on its own at build time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

COMMIT_FILE = "_commit.txt"
NOT_INSTALLED = "not installed"
UNKNOWN = "unknown"

# The TensorRT module the engine imports, in the order engines.tensorrt.import_tensorrt tries them.
_TENSORRT_MODULES = (("tensorrt", "full"), ("tensorrt_lean_bindings", "lean"))


@dataclasses.dataclass(frozen=True, slots=True)
class BuildInfo:
    """The running build. Field names are the Prometheus label names and the log keys."""

    version: str
    commit: str
    onnxruntime: str
    numpy: str
    tensorrt: str
    cuda_bindings: str

    def fields(self) -> dict[str, str]:
        """The fields by name, for a log line or an info metric's labels."""
        return dataclasses.asdict(self)

    def render(self) -> str:
        """The text ``tradingd --version`` prints."""
        rows = {
            "commit": self.commit,
            "onnxruntime": self.onnxruntime,
            "numpy": self.numpy,
            "tensorrt": self.tensorrt,
            "cuda-bindings": self.cuda_bindings,
        }
        return "\n".join([f"tradingd {self.version}", *(f"{name:<13}  {value}" for name, value in rows.items())])


def git_commit(root: Path) -> str | None:
    """``HEAD`` of the git checkout at ``root``, with ``-dirty`` if tracked files differ from it;
    None where ``root`` is not a checkout or git cannot say."""
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        return None
    try:
        head, status = (
            subprocess.run([git, "-C", str(root), *args], check=False, capture_output=True, text=True, timeout=10)
            for args in (("rev-parse", "--verify", "HEAD"), ("status", "--porcelain", "--untracked-files=no"))
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _commit() -> str:
    package = Path(__file__).resolve().parent
    try:
        recorded = (package / COMMIT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    return recorded or git_commit(package.parent) or UNKNOWN


def _module_version(modules: Mapping[str, list[str]], module: str, flavor: str | None = None) -> str | None:
    # The distribution that installs ``module`` (onnxruntime or onnxruntime-gpu, say); None if none does.
    for dist in modules.get(module, ()):
        version = _dist_version(dist)
        if version != NOT_INSTALLED:
            return f"{version} ({flavor}, {dist.replace('_', '-').lower()})" if flavor else version
    return None


@functools.cache
def build_info() -> BuildInfo:
    """The running build, worked out once per process (about a tenth of a second: the TensorRT
    lookup scans the installed distributions, and a checkout asks git)."""
    modules = importlib.metadata.packages_distributions()
    tensorrt = (_module_version(modules, module, flavor) for module, flavor in _TENSORRT_MODULES)
    return BuildInfo(
        # A source tree that was never installed has no metadata to read the release from.
        version=release if (release := _dist_version("tradingd")) != NOT_INSTALLED else UNKNOWN,
        commit=_commit(),
        onnxruntime=_module_version(modules, "onnxruntime") or NOT_INSTALLED,
        numpy=_module_version(modules, "numpy") or NOT_INSTALLED,
        tensorrt=next((v for v in tensorrt if v is not None), NOT_INSTALLED),
        # Not by module: the ``cuda`` namespace is shared with cuda-pathfinder and others.
        cuda_bindings=_dist_version("cuda-bindings"),
    )
