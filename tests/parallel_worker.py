"""The distributed half of tests/test_parallel_gloo.py: every rank trains the same model on the
same data under several parallel layouts, one after the other in one process group, and rank 0
saves what each layout measured next to a single-process run of the same steps.

Also runnable by hand: ``python tests/parallel_worker.py WORLD OUT_DIR LAYOUT...``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from emu2_engine.data.packing import collate_packed
from emu2_engine.data.sequences import Sample
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.parallel import MicroBatchShape, ParallelConfig, ParallelDims, parallelize

STEPS = 3
MICROBATCHES = 2  # per optimiser step, over all data-parallel ranks (see micro_batches)
ROWS, SEQ_LEN, MAX_IMAGES = 2, 64, 3
MAX_NORM = 0.5  # below the debug model's gradient norm, so clipping acts
SEED = 0

# name: (world size, ParallelDims fields, ParallelConfig fields, LLM layers (None: the preset's 2;
# the interleaved and zero-bubble schedules need 4 stages, so 3 or more layers))
LAYOUTS = {
    "tp2": (2, dict(tp=2), {}, None),
    "tp2-ac-selective": (2, dict(tp=2), dict(activation_checkpoint="selective"), None),
    "fsdp2": (2, dict(dp_shard=2), {}, None),
    "pp2-1f1b": (2, dict(pp=2), dict(pp_schedule="1f1b"), None),
    "pp2-interleaved": (2, dict(pp=2), dict(pp_schedule="interleaved-1f1b", stages_per_rank=2), 4),
    "pp2-zero-bubble": (2, dict(pp=2), dict(pp_schedule="zero-bubble", stages_per_rank=2), 4),
    "pp2-zbv-ac-full": (2, dict(pp=2), dict(pp_schedule="zbv", stages_per_rank=2,
                                           activation_checkpoint="full"), 4),
    "tp2-pp2": (4, dict(tp=2, pp=2), {}, None),
    "tp2-fsdp2": (4, dict(tp=2, dp_shard=2), {}, None),
    "hsdp2x2-ac-selective": (4, dict(dp_replicate=2, dp_shard=2),
                             dict(activation_checkpoint="selective"), None),
    "fsdp2-pp2": (4, dict(dp_shard=2, pp=2), {}, None),
    "tp2-fsdp2-bf16": (4, dict(tp=2, dp_shard=2), dict(param_dtype="bfloat16"), None),
    # Not run by the tests (inductor compiles every block on every rank: minutes on 2 cores).
    "tp2-compile": (2, dict(tp=2), dict(compile=True), None),
}


def model_config(layers: int | None) -> Emu2Config:
    cfg = Emu2Config.from_preset("debug")
    return cfg if layers is None else replace(cfg, llm=replace(cfg.llm, layers=layers))


def make_batches(cfg: Emu2Config, n: int, seed: int):
    """`n` packed micro-batches of fixed shape: ROWS x SEQ_LEN tokens, MAX_IMAGES images of which
    one is padding. Row 0 packs a document with a regressed image and a text document, row 1 a
    text document and one with a bidirectional image; lengths, image positions, tokens and
    pixels are random; every third micro-batch has a text document instead of the
    bidirectional one."""
    rng = np.random.default_rng(seed)
    ids, nq, size = cfg.special_ids, cfg.n_query, cfg.vision.image_size

    def document(image: str | None) -> Sample:
        text = [ids.bos] + rng.integers(3, cfg.base_vocab_size, int(rng.integers(4, 12))).tolist()
        target = [True] * len(text)
        if image is None:
            return Sample(np.asarray(text + [ids.eos]), np.asarray(target + [True]))
        at = int(rng.integers(1, len(text)))
        visual = [ids.img] + [ids.image] * nq + [ids.img_end]
        pixels = torch.from_numpy(rng.standard_normal((3, size, size)).astype(np.float32))
        return Sample(np.asarray(text[:at] + visual + text[at:] + [ids.eos]),
                      np.asarray(target[:at] + [False] * len(visual) + target[at:] + [True]),
                      [pixels], [at], [image == "regressed"], [image == "bidirectional"])

    batches = []
    for k in range(n):
        # every third micro-batch holds one real image (two padding): the encoder then sees a
        # batch of one, as it does when the trainer drops or skips the padding
        last = "bidirectional" if k % 3 != 2 else None
        samples = [document("regressed"), document(None), document(None), document(last)]
        batches.append(collate_packed(samples, [[0, 1], [2, 3]], SEQ_LEN, ids, nq, size,
                                      max_images=MAX_IMAGES))
    return batches


def _build_model(cfg: Emu2Config) -> Emu2Model:
    torch.manual_seed(SEED)
    return Emu2Model(cfg)


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)


def micro_batches(name: str) -> int:
    """Micro-batches per step of a layout, over all its data-parallel ranks: at least
    MICROBATCHES, at least one per rank, and per rank at least one per pipeline rank (1F1B)."""
    dims = ParallelDims(**LAYOUTS[name][1])
    return dims.dp * max(dims.pp, -(-MICROBATCHES // dims.dp))


def reference_run(cfg: Emu2Config, batches, n_micro: int) -> dict:
    """The single-process run: each step averages the loss of `n_micro` micro-batches."""
    model = _build_model(cfg)
    opt = _optimizer(model.parameters())
    losses, norms = [], []
    for step in range(STEPS):
        step_losses = []
        for batch in batches[step * n_micro:(step + 1) * n_micro]:
            out = model(batch)
            (out.total / n_micro).backward()
            step_losses.append(torch.stack([out.total, out.ce, out.mse]).detach())
        losses.append(torch.stack(step_losses).mean(0))
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad()
    return {"losses": torch.stack(losses), "norms": torch.stack(norms),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _plain_name(name: str) -> str:
    """A parameter name inside a stage, as the unsplit model names it."""
    return name.removeprefix("model.").replace("_checkpoint_wrapped_module.", "")


def parallel_run(name: str, batches) -> dict:
    world, dims_kw, cfg_kw, layers = LAYOUTS[name]
    cfg = model_config(layers)
    dims = ParallelDims(**dims_kw)
    mesh = dims.build_mesh("cpu")
    n_micro = micro_batches(name)
    pcfg = ParallelConfig(**{"param_dtype": "float32", "microbatches": n_micro // dims.dp, **cfg_kw})
    shape = MicroBatchShape(ROWS, SEQ_LEN, MAX_IMAGES)
    pm = parallelize(_build_model(cfg), dims, mesh, pcfg, shape)
    opt = _optimizer(pm.parameters())
    losses, norms = [], []
    per_rank = n_micro // dims.dp
    start = time.perf_counter()
    for step in range(STEPS):
        step_batches = batches[step * n_micro:(step + 1) * n_micro]
        mine = step_batches[dims.dp_rank * per_rank:(dims.dp_rank + 1) * per_rank]
        # as the trainer hands them over: padding dropped, or under a schedule counted (stage 0
        # encodes the real images only)
        mine = [b.with_real_images() if pm.schedule is not None else b.without_padding_images()
                for b in mine]
        losses.append(pm.forward_backward(mine))
        norms.append(pm.clip_grad_norm_(MAX_NORM))
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    sharded_grads = None
    if dims.fsdp_mesh is not None and pm.schedule is None:
        sharded_grads = _grads_sharded_between_micro_batches(pm, batches[:2])
        opt.zero_grad()
    params = {}
    for stage in pm.stages:
        for pname, p in stage.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            params[_plain_name(pname)] = full.detach().clone()
    layout = {_plain_name(n): (str(p.placements), tuple(p.to_local().shape))
              for stage in pm.stages for n, p in stage.named_parameters() if isinstance(p, DTensor)}
    return {"losses": torch.stack(losses), "norms": torch.stack(norms), "params": params,
            "seconds": seconds, "layout": layout, "sharded_grads": sharded_grads}


def _grads_sharded_between_micro_batches(pm, batches) -> bool:
    """Under FSDP: after the first of two micro-batches, has FSDP reduce-scattered every
    gradient, so that no parameter's whole (unsharded) gradient is held until the next
    micro-batch? Skipping the gradient sync keeps them all (FSDP's `unsharded_accumulated_grad`);
    HSDP without its all-reduce keeps only the reduce-scattered shards."""
    from torch.distributed.fsdp import FSDPModule

    from emu2_engine.parallel.pipeline import stage_inputs

    seen = {}

    def inputs():
        yield stage_inputs(batches[0], host_indices=True)
        groups = [m._get_fsdp_state()._fsdp_param_group for stage in pm.stages for m in stage.modules()
                  if isinstance(m, FSDPModule)]
        params = [fp for group in groups if group is not None for fp in group.fsdp_params]
        seen["sharded"] = bool(params) and not any(_unsharded_grad(fp) for fp in params)
        yield stage_inputs(batches[1], host_indices=True)

    pm._accumulate(inputs(), 2)
    return seen["sharded"]


def _unsharded_grad(fsdp_param) -> bool:
    """Does FSDP hold this parameter's whole gradient (accumulating without a sync: in the
    unsharded parameter's ``.grad``, or in a buffer of the reduce dtype)?"""
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    return fsdp_param.unsharded_accumulated_grad is not None or (unsharded is not None and unsharded.grad is not None)


def run(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    # A layout that fails on one rank must not leave the others waiting forever.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    references = {}
    for name in names:
        layers, n_micro = LAYOUTS[name][3], micro_batches(name)
        cfg = model_config(layers)
        batches = make_batches(cfg, STEPS * n_micro, seed=1)
        if (layers, n_micro) not in references and rank == 0:
            references[layers, n_micro] = reference_run(cfg, batches, n_micro)
        try:
            res = parallel_run(name, batches)
        except Exception as e:  # noqa: BLE001 -- recorded, the test reports it
            import traceback
            res = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            results[name] = {"ranks": gathered, "reference": references[layers, n_micro]}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


def launch(world: int, names: list[str], out_dir: str) -> dict:
    """Run the named layouts (all of world size `world`) on `world` spawned gloo ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(world, os.path.join(tmp, "init"), out_dir, names), nprocs=world, join=True)
    return torch.load(os.path.join(out_dir, "results.pt"), weights_only=False)


if __name__ == "__main__":
    world, out = int(sys.argv[1]), sys.argv[2]
    results = launch(world, sys.argv[3:], out)
    for name, res in results.items():
        ref = res["reference"]
        for rank, r in enumerate(res["ranks"]):
            if "error" in r:
                print(name, rank, r["error"])
                continue
            dl = (r["losses"] - ref["losses"]).abs().max().item()
            dn = (r["norms"] - ref["norms"]).abs().max().item()
            dp = max(((v - ref["params"][k]).abs().max().item() for k, v in r["params"].items()), default=0)
            print(f"{name} rank {rank}: loss diff {dl:.2e} norm diff {dn:.2e} param diff {dp:.2e} "
                  f"({r['seconds']:.1f} s) losses {r['losses'][:, 0].tolist()}")
