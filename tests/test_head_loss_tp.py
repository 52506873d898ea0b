"""Vocabulary-parallel `emu2_head_loss` on 2 gloo ranks (CPU) against the unsharded loss.

One pair of processes runs every case (start-up is paid once): each rank holds the same hidden
states, labels and regression inputs and its own contiguous block of LM-head rows (an uneven
split), and saves its results; the tests compare them with the unsharded reference in fp64.
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from emu2_engine.ops import emu2_head_loss
from emu2_engine.ops.head_loss import emu2_head_loss_reference

WORLD = 2
V = 1000
SPLIT = 437  # rank 0 holds vocabulary rows [0, 437), rank 1 [437, 1000)
# name: (backend, tokens, z_loss, which labels)
CASES = {
    "torch": ("auto", 301, 0.0, "any"),
    "triton": ("triton", 301, 0.0, "any"),
    "torch-z-loss": ("auto", 150, 0.01, "any"),
    "triton-z-loss": ("triton", 150, 0.01, "any"),
    "targets-on-rank-1-only": ("triton", 64, 0.0, "high"),
    "no-text": ("auto", 33, 0.0, "none"),
    # More labelled tokens than one chunk of the larger shard holds: ranks with shards of
    # different sizes must still cut the same chunks.
    "several-chunks": ("triton", 1400, 0.0, "any"),
}
# fp32 fused result against the fp64 reference: gradients relative to their largest element.
RTOL = 2e-5


def _inputs(name):
    backend, T, z_loss, which = CASES[name]
    g = torch.Generator().manual_seed(len(name) * 7 + T)
    H, R, C = 48, 9, 40
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    lm = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 * H ** -0.5
    labels = torch.randint(0, V, (T,), generator=g)
    if which == "high":
        labels = torch.randint(SPLIT, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.2] = -100
    if which == "none":
        labels.fill_(-100)
    down = torch.randn(C, H, generator=g, dtype=torch.float64) * H ** -0.5
    index = torch.randint(0, T, (R,), generator=g)
    target = torch.randn(R, C, generator=g, dtype=torch.float64)
    return hidden, lm, labels, down, index, target, z_loss, backend


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, V)
    results = {}
    for name in CASES:
        hidden, lm, labels, down, index, target, z_loss, backend = _inputs(name)
        os.environ["EMU2_KERNELS"] = backend
        h, w, d = (t.float().requires_grad_() for t in (hidden, lm[rows].contiguous(), down))
        out = emu2_head_loss(h, w, labels, d, index, target.float(), 0.7, z_loss=z_loss,
                             group=dist.group.WORLD)
        out.total.backward()
        results[name] = {"total": out.total.detach(), "ce": out.ce.detach(), "mse": out.mse.detach(),
                         "n_text": out.n_text, "d_hidden": h.grad, "d_lm": w.grad, "d_down": d.grad}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_matches_unsharded(sharded, name):
    hidden, lm, labels, down, index, target, z_loss, _ = _inputs(name)
    h, w, d = (t.clone().requires_grad_() for t in (hidden, lm, down))
    ref = emu2_head_loss_reference(h, w, labels, d, index, target, 0.7, z_loss=z_loss)
    ref.total.backward()
    grads = {"d_hidden": h.grad, "d_lm": w.grad, "d_down": d.grad}
    for rank, res in enumerate(r[name] for r in sharded):
        assert int(res["n_text"]) == int(ref.n_text)
        for key in ("total", "ce", "mse"):
            torch.testing.assert_close(res[key].double(), getattr(ref, key).double(), rtol=RTOL, atol=1e-6)
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, V)
        for key, want in (("d_hidden", grads["d_hidden"]), ("d_down", grads["d_down"]),
                          ("d_lm", None if grads["d_lm"] is None else grads["d_lm"][rows])):
            got = res[key].double()
            if want is None:  # the reference gives no gradient where nothing was counted
                assert got.abs().max() == 0, (rank, key)
                continue
            scale = max(want.abs().max().item(), 1e-6)
            torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=RTOL,
                                       msg=f"rank {rank} {key}")
