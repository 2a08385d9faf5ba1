"""Build hooks only (the package itself is described in pyproject.toml): the wheel records the git
commit it was built from in ``daemon/_commit.txt``, which ``tradingd --version`` reports.

A wheel built from the checkout asks git; an sdist carries the commit in the same file, so a
wheel built from the sdist (``python -m build`` builds the sdist, then the wheel from it) records
it too. An editable install records nothing: ``daemon.version`` asks git at run time instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def _version_module() -> ModuleType:
    # daemon/version.py imports only the standard library; loaded by path, not through daemon/__init__.
    spec = importlib.util.spec_from_file_location("_tradingd_version", ROOT / "daemon" / "version.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up
    spec.loader.exec_module(module)
    return module


def _write_commit(package_dir: Path) -> None:
    version = _version_module()
    recorded = ROOT / "daemon" / version.COMMIT_FILE  # present in an sdist only
    commit = version.git_commit(ROOT) or (recorded.read_text(encoding="utf-8").strip() if recorded.exists() else "")
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / version.COMMIT_FILE).write_text((commit or version.UNKNOWN) + "\n", encoding="utf-8")


class BuildPyWithCommit(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            _write_commit(Path(self.build_lib) / "daemon")


class SdistWithCommit(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        _write_commit(Path(base_dir) / "daemon")


setup(cmdclass={"build_py": BuildPyWithCommit, "sdist": SdistWithCommit})
