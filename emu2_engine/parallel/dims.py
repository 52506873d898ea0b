"""`ParallelDims`: the degrees of data, tensor and pipeline parallelism, checked against the world
size and the model, and the one named `DeviceMesh` they span.

The mesh has the dimensions ``("pp", "dp_replicate", "dp_shard", "tp")`` in that order, keeping
only those whose degree is above 1: tensor parallelism innermost (its collectives run in every
block, so its ranks should share a node), pipeline parallelism outermost (it only sends
activations between neighbours). Ranks are laid out row-major over that shape, as
`init_device_mesh` does. A world of one rank gets a one-rank ``dp_shard`` mesh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from emu2_engine.models.config import Emu2Config

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
"""Mesh dimension names, outermost first."""


@dataclass
class ParallelDims:
    """How the ranks are split: dp_replicate x dp_shard x tp x pp = world size."""

    dp_replicate: int = 1
    """HSDP replicas: groups of ranks that hold the same parameter shards; gradients are
    all-reduced across them (needs dp_shard > 1)."""
    dp_shard: int = 1
    """FSDP degree: ranks that split parameters, gradients and optimiser state among them."""
    tp: int = 1
    """Tensor (and sequence) parallel degree: attention heads, FFN columns and the vocabulary
    are split over these ranks, which should share a node."""
    pp: int = 1
    """Pipeline degree: ranks that each hold a contiguous part of the model."""
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Ranks that read different data: dp_replicate x dp_shard."""
        return self.dp_replicate * self.dp_shard

    def validate(self, world_size: int, model: Emu2Config | None = None) -> None:
        """Raise ValueError with one line naming the first problem: a degree below 1, a product
        that is not the world size, or (with `model`) a tensor-parallel degree that does not
        divide the heads, kv heads or FFN/MLP widths. The vocabulary may split unevenly (the
        embedding and `emu2_head_loss` take blocks of any size)."""
        for name in ("dp_replicate", "dp_shard", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name} must be an integer >= 1, got {value!r}")
        if self.world_size != world_size:
            raise ValueError(
                f"parallel degrees dp_replicate x dp_shard x tp x pp = {self.dp_replicate} x "
                f"{self.dp_shard} x {self.tp} x {self.pp} = {self.world_size} must equal the "
                f"world size {world_size}")
        if self.dp_replicate > 1 and self.dp_shard == 1:
            raise ValueError(f"parallel.dp_replicate = {self.dp_replicate} needs dp_shard > 1 "
                             f"(HSDP); for plain data parallelism set dp_shard = "
                             f"{self.dp_replicate} instead")
        if model is not None and self.tp > 1:
            vision, llm = model.vision, model.llm
            for what, size in (("vision.heads", vision.heads), ("vision.mlp_hidden", vision.mlp_hidden),
                               ("llm.heads", llm.heads), ("llm.kv_heads", llm.kv_heads),
                               ("llm.ffn_hidden", llm.ffn_hidden)):
                if size % self.tp:
                    raise ValueError(f"parallel.tp = {self.tp} must divide {what} ({size}) of "
                                     f"the model {model.name!r}")
            if self.dp_shard > 1 and vision.width % self.dp_shard:
                # FSDP splits the TP-split fused qkv weight along its input width (parallel/fsdp.py).
                raise ValueError(f"with tp > 1, parallel.dp_shard = {self.dp_shard} must divide "
                                 f"vision.width ({vision.width}) of the model {model.name!r}")

    # -- the mesh ------------------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The named mesh over all ranks (needs an initialised process group whose size is the
        product of the degrees). Also kept on this object for the submesh accessors."""
        if not dist.is_initialized():
            raise ValueError("build_mesh needs torch.distributed to be initialised first")
        self.validate(dist.get_world_size())
        names = tuple(n for n in MESH_DIMS if getattr(self, n) > 1) or ("dp_shard",)
        self._mesh = init_device_mesh(device_type, tuple(getattr(self, n) for n in names),
                                      mesh_dim_names=names)
        return self._mesh

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise ValueError("no mesh yet: call build_mesh(device_type) first")
        return self._mesh

    def _submesh(self, *names: str) -> DeviceMesh | None:
        present = tuple(n for n in names if getattr(self, n) > 1)
        if not present:
            return None
        return self.mesh[present if len(present) > 1 else present[0]]

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The tensor-parallel submesh (1-D), None when tp = 1."""
        return self._submesh("tp")

    @property
    def pp_mesh(self) -> DeviceMesh | None:
        """The pipeline submesh (1-D), None when pp = 1."""
        return self._submesh("pp")

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """What `fully_shard` takes: ("dp_shard",) for FSDP, ("dp_replicate", "dp_shard") for
        HSDP; None without data parallelism."""
        return self._submesh("dp_replicate", "dp_shard")

    @property
    def dp_rank(self) -> int:
        """Which of the dp data streams this rank reads (ranks of one TP group or pipeline
        read the same micro-batches)."""
        coords = dict(zip(self.mesh.mesh_dim_names, self.mesh.get_coordinate()))
        return coords.get("dp_replicate", 0) * self.dp_shard + coords.get("dp_shard", 0)
