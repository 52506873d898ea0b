"""Plain PyTorch modules of the Emu2 architecture; no parallelism inside (see parallel/)."""

from emu2_engine.models.config import PRESETS, Emu2Config, LlamaConfig, VisionConfig
from emu2_engine.models.emu2 import Emu2Model

__all__ = ["Emu2Config", "Emu2Model", "LlamaConfig", "PRESETS", "VisionConfig"]
