"""Parallelism applied to the plain model: `ParallelDims` and the mesh, TP/SP plans, pipeline
stages and schedules, FSDP2, activation checkpointing (`docs/parallel.md`)."""

from emu2_engine.parallel.apply import ParallelConfig, ParallelModel, parallelize
from emu2_engine.parallel.dims import ParallelDims
from emu2_engine.parallel.pipeline import MicroBatchShape

__all__ = ["ParallelConfig", "ParallelDims", "ParallelModel", "MicroBatchShape", "parallelize"]
