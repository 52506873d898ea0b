"""Checkpoints: import and export of the released Emu2 weights."""

from emu2_engine.checkpoint.released import (
    CorruptCheckpointError,
    LoadReport,
    WeightsError,
    export_released_weights,
    load_released_weights,
    load_weights,
    to_engine_name,
    to_released_name,
    write_safetensors,
)

__all__ = [
    "CorruptCheckpointError",
    "LoadReport",
    "WeightsError",
    "export_released_weights",
    "load_released_weights",
    "load_weights",
    "to_engine_name",
    "to_released_name",
    "write_safetensors",
]
