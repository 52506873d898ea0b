"""`LocalShards` (the TP style that hands a module its local shards as plain tensors) on a
one-rank gloo mesh, in a spawned process: every block runs compiled under torch.compile (Dynamo
guards on the always-call hook's identity, so each block compiles its own code, and at the
default recompile limit of 8 the ViT's blocks past the eighth ran eager); activation
checkpointing's early-stopped recomputation leaves the parameters restored; a forward that
raises is undone by the next."""

import os
import tempfile

import torch
import torch.multiprocessing as mp

N_BLOCKS = 10  # more than dynamo's recompile limit (8)


def _run(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    from torch.utils.checkpoint import checkpoint

    from emu2_engine.parallel.fsdp import allow_recompiles
    from emu2_engine.parallel.tensor_parallel import LocalShards

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    blocks = []
    for _ in range(N_BLOCKS):
        block = Block()
        LocalShards({"weight": Replicate(), "bias": Replicate()})._apply(block.norm, mesh)
        LocalShards({"weight": Replicate(), "bias": Replicate()})._apply(block.fc, mesh)
        blocks.append(block)
    # checkpointed (non-reentrant, which stops its recomputation early by raising): after the
    # backward every parameter is a DTensor again
    x = torch.randn(4, 8, requires_grad=True)
    checkpoint(blocks[1], x, use_reentrant=False).sum().backward()
    after_checkpoint = all(isinstance(p, DTensor) for p in blocks[1].parameters())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    allow_recompiles(N_BLOCKS)  # as fsdp.apply_compile does
    compiled = [torch.compile(b) for b in blocks]
    x = torch.randn(4, 8)
    for c in compiled:
        x = c(x)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    # A forward that raises (a wrong width), then a good one: the parameters are DTensors
    # again, and the output is the eager one of the same weights.
    plain = blocks[0]
    try:
        plain(torch.randn(4, 3))
        raised = False
    except RuntimeError:
        raised = True
    y = plain(torch.ones(2, 8))
    dtensors = all(isinstance(p, DTensor) for p in plain.parameters())
    with torch.no_grad():
        h = nn.functional.layer_norm(torch.ones(2, 8), (8,), plain.norm.weight.to_local(),
                                     plain.norm.bias.to_local())
        want = torch.ones(2, 8) + nn.functional.linear(h, plain.fc.weight.to_local(), plain.fc.bias.to_local())
    torch.save({"after_checkpoint": after_checkpoint, "graphs": graphs, "raised": raised,
                "dtensors": dtensors, "close": torch.allclose(y, want, atol=1e-6)}, out)
    dist.destroy_process_group()


def test_blocks_run_compiled_and_parameters_come_back():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_run, args=(os.path.join(tmp, "init"), out), nprocs=1, join=True)
        res = torch.load(out)
    assert res["after_checkpoint"]
    assert res["graphs"] == N_BLOCKS  # each block compiled, none left eager at the limit
    assert res["raised"] and res["dtensors"] and res["close"]
