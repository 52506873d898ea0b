"""Build of the compiled parts; the project metadata lives in pyproject.toml.

`pip install --no-build-isolation --no-deps -e .` (what `make build` runs) and
`python setup.py build_ext --inplace` both run CMake on CMakeLists.txt and leave
`emu2_engine/_C*.so` in the source tree. Set EMU2_BUILD_CUDA=1 to also build the CUDA
kernels in csrc/cuda (the library `libemu2_cuda.so`, next to `_C`) where a CUDA toolkit is
installed.

The top-level `kernels/` directory is installed as the package `emu2_engine.kernels`
(package_dir below), never as a top-level `kernels`: a PyPI package already uses that name.
An editable install therefore uses setuptools' import finder for `emu2_engine`, not a .pth
entry that would put the repository root on sys.path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_LIBRARY_GLOB = "libemu2_cuda*.so"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "TRUE", "YES"}


def _tool(name: str) -> str | None:
    """The tool next to this interpreter (the venv's cmake/ninja wheels), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools compiles nothing itself."""

    def __init__(self, name: str, source_dir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with the output directory setuptools expects.

    The CMake build tree is kept in build/cmake-<SOABI>-<hash of sys.prefix> rather than in
    setuptools' build_temp (a fresh temporary directory for every editable install), so
    `make build` recompiles only what changed.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("building emu2_engine._C needs cmake (pip install cmake)")
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]  # one tree per environment
        build_dir = ROOT / "build" / f"cmake-{sysconfig.get_config_var('SOABI')}-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)

        cuda = _flag("EMU2_BUILD_CUDA")
        configure = [
            cmake, "-S", str(ext.source_dir), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DEMU2_BUILD_CUDA={'ON' if cuda else 'OFF'}",
        ]
        ninja = _tool("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():  # the generator is fixed once
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = self.parallel or os.cpu_count() or 1
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], check=True)

        if not output.is_file():
            raise RuntimeError(f"CMake did not produce {output}; see the build log above")
        self._cuda_libraries = sorted(output.parent.glob(CUDA_LIBRARY_GLOB)) if cuda else []

    def copy_extensions_to_source(self) -> None:
        """--inplace and editable installs: also copy libemu2_cuda.so beside `_C`."""
        super().copy_extensions_to_source()
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("emu2_engine"))
        for library in getattr(self, "_cuda_libraries", []):
            self.copy_file(str(library), str(package_dir / library.name), level=self.verbose)


setup(
    packages=find_packages(include=["emu2_engine", "emu2_engine.*"])
    + ["emu2_engine.kernels"]
    + [f"emu2_engine.kernels.{p}" for p in find_packages(where="kernels")],
    package_dir={"emu2_engine.kernels": "kernels"},
    ext_modules=[CMakeExtension("emu2_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
)
