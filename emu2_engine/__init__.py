"""emu2_engine: training and inference for Emu2-style generative multimodal models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """Make the repository's top-level `kernels/` importable as `emu2_engine.kernels`.

    An installed wheel puts the kernels inside the package (setup.py's package_dir maps them);
    a source checkout (PYTHONPATH=repo, as on the GPU machines) has them beside it. They are
    never importable as a top-level `kernels` module, a name a PyPI package already uses.
    """
    if "emu2_engine.kernels" in sys.modules or (Path(__file__).parent / "kernels").is_dir():
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "emu2_engine.kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["emu2_engine.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_kernels()
