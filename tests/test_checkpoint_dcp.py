"""DCP checkpoints (`emu2_engine.checkpoint.dcp`): bit-exact resume in one process, keep-K,
crashed and corrupt checkpoints, asynchronous saves, and FSDP2-sharded state on 2 gloo ranks
(one spawn), reloaded by a single process."""

import logging
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from emu2_engine.checkpoint.dcp import CheckpointError, Checkpointer, complete_checkpoints, latest, step_folder


# ----------------------------------------------------------------------------------------------
# A tiny training run that uses every kind of state: parameters, AdamW moments, a warm-up
# schedule, a data loader with a position and a generator, dropout (torch RNG), NumPy noise and
# a Python-random loss scale.
# ----------------------------------------------------------------------------------------------
class TinyLoader:
    """Batches drawn from its own generator; its state is the position and the generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.position += 1
        x = torch.randn(8, 6, generator=self.generator)
        return x, x.sum(dim=1, keepdim=True).sin()

    def state_dict(self) -> dict:
        return {"position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self.generator.set_state(state["generator"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched, TinyLoader(seed)


def train_step(model, opt, sched, loader) -> float:
    x, y = loader.next()
    x = x + torch.from_numpy(np.random.randn(*x.shape).astype(np.float32)) * 0.01
    loss = ((model(x) - y) ** 2).mean() * (1.0 + 0.01 * random.random())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def test_resume_is_bit_exact(tmp_path):
    """Interrupted at step 3 and resumed into a differently initialised run with scrambled RNGs,
    the next 3 losses equal the uninterrupted run's bit for bit."""
    seed_everything(0)
    run = make_run(0)
    straight = [train_step(*run) for _ in range(6)]

    seed_everything(0)
    first = make_run(0)
    saver = Checkpointer(tmp_path, *first[:2], scheduler=first[2], dataloader=first[3])
    assert [train_step(*first) for _ in range(3)] == straight[:3]
    path = saver.save(3)
    assert path == tmp_path / "step-000003" and latest(tmp_path) == path

    seed_everything(123)
    second = make_run(7)
    train_step(*second)  # moves every state away from the checkpoint's
    loader = Checkpointer(tmp_path, *second[:2], scheduler=second[2], dataloader=second[3])
    assert loader.load() == 3
    for a, b in zip(first[0].parameters(), second[0].parameters()):
        assert torch.equal(a, b)
    assert second[2].last_epoch == 3 and second[3].position == 3
    assert [train_step(*second) for _ in range(3)] == straight[3:]


def test_keep_k_and_crashed_temp_folders(tmp_path):
    model, opt, sched, data = make_run(0)
    ck = Checkpointer(tmp_path, model, opt, scheduler=sched, dataloader=data, keep=2)
    for step in range(1, 6):
        train_step(model, opt, sched, data)
        ck.save(step)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]

    # A save that crashed leaves a temp folder; a folder without DCP's index is not complete.
    crashed = tmp_path / "step-000009.tmp"
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"partial")
    no_index = tmp_path / "step-000010"
    no_index.mkdir()
    (no_index / "__0_0.distcp").write_bytes(b"partial")
    assert latest(tmp_path) == tmp_path / "step-000005"
    assert Checkpointer(tmp_path, *make_run(1)[:2]).load() == 5
    with pytest.raises(CheckpointError, match="step-000010 is not a complete checkpoint"):
        ck.load(10)
    ck.save(6)  # the next save clears the crashed temp folder
    assert not crashed.exists() and latest(tmp_path) == step_folder(tmp_path, 6)
    train_step(model, opt, sched, data)
    ck.save(6)  # saving a step again replaces it
    fresh = make_run(3)
    assert Checkpointer(tmp_path, fresh[0]).load(6) == 6
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh[0].parameters()))
    assert latest(tmp_path / "nothing-here") is None
    assert Checkpointer(tmp_path / "nothing-here", model).load() is None


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    """Save 100 and 200, resume from 100, save 150: step 200 belongs to the abandoned history.
    It is moved aside (not counted by keep, not picked by resume=auto), and with keep=1 saving
    160 keeps 160 itself, not the older-history 200."""
    model, opt, sched, data = make_run(0)
    ck = Checkpointer(tmp_path, model, opt, scheduler=sched, dataloader=data, keep=2)
    ck.save(100)
    train_step(model, opt, sched, data)
    ck.save(200)
    assert ck.load(100) == 100
    train_step(model, opt, sched, data)
    ck.save(150)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [100, 150]
    assert latest(tmp_path) == step_folder(tmp_path, 150)
    aside = tmp_path / "abandoned-step-000200"
    assert (aside / ".metadata").is_file()  # its data is kept, under a name latest() ignores
    assert Checkpointer(tmp_path, make_run(1)[0]).load(str(aside)) == 200

    # keep=1 from a history that again holds a later step (the abandoned name is taken: -2).
    train_step(model, opt, sched, data)
    ck.save(200)
    assert ck.load(150) == 150
    ck_one = Checkpointer(tmp_path, model, opt, scheduler=sched, dataloader=data, keep=1)
    ck_one.save(160)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [160]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "abandoned-step-000200", "abandoned-step-000200-2", "step-000160"]
    assert Checkpointer(tmp_path, make_run(1)[0]).load() == 160


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    model, opt, sched, data = make_run(0)
    train_step(model, opt, sched, data)
    path = Checkpointer(tmp_path, model, opt).save(1)

    wider = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 1))
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*step-000001 into this model: .*"):
        Checkpointer(tmp_path, wider).load()
    renamed = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))  # "3.weight" -> "2.weight"
    with pytest.raises(CheckpointError, match=r"into this model: .*[Mm]issing key.*2\.weight"):
        Checkpointer(tmp_path, renamed).load()

    (path / ".metadata").write_bytes(b"\x00garbage, not a DCP index")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step-000001 \(corrupt"):
        Checkpointer(tmp_path, model, opt).load(path)


def test_checkpointed_emu2_model_loads_into_a_plain_one(tmp_path):
    """The debug Emu2 model wrapped by the engine's activation checkpointing (which renames
    parameters) saves under the plain names: a model without the wrappers loads it."""
    from emu2_engine.models import Emu2Config, Emu2Model
    from emu2_engine.parallel.fsdp import apply_ac

    cfg = Emu2Config.from_preset("debug")
    torch.manual_seed(0)
    wrapped = Emu2Model(cfg)
    apply_ac(wrapped, "full")
    Checkpointer(tmp_path, wrapped, torch.optim.AdamW(wrapped.parameters())).save(7)
    torch.manual_seed(1)
    plain = Emu2Model(cfg)
    assert Checkpointer(tmp_path, plain, torch.optim.AdamW(plain.parameters())).load() == 7
    want = wrapped.state_dict()
    assert set(want) == set(plain.state_dict())
    assert all(torch.equal(want[k], v) for k, v in plain.state_dict().items())


def test_a_checkpoint_with_its_optimiser_groups_by_position_still_resumes(tmp_path, monkeypatch):
    """Checkpoints written before the optimiser groups were keyed by parameter name (by
    position) resume as exactly as new ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    import emu2_engine.checkpoint.dcp as dcp_module

    seed_everything(0)
    run = make_run(0)
    straight = [train_step(*run) for _ in range(6)]
    seed_everything(0)
    first = make_run(0)
    [train_step(*first) for _ in range(3)]
    with monkeypatch.context() as m:
        m.setattr(dcp_module, "_FLAT", StateDictOptions())
        Checkpointer(tmp_path, *first[:2], scheduler=first[2], dataloader=first[3]).save(3)
    assert any(dcp_module._GROUPS_BY_POSITION.match(k) for k in Checkpointer._saved_keys(tmp_path / "step-000003"))
    seed_everything(123)
    second = make_run(7)
    assert Checkpointer(tmp_path, *second[:2], scheduler=second[2], dataloader=second[3]).load() == 3
    assert [train_step(*second) for _ in range(3)] == straight[3:]


class Counts:
    def __init__(self, n: int):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_the_data_position_follows_the_data_parallel_rank(tmp_path, caplog):
    """The data position is saved per data-parallel rank: it loads into the same degree (the
    layout may differ), it is left alone with a warning for another degree (samples would
    repeat or be skipped), and a checkpoint saved per rank (older ones) still loads. `extra`
    entries come back, or are named in the warning when the checkpoint lacks them."""
    model, opt, sched, data = make_run(0)
    for _ in range(2):
        train_step(model, opt, sched, data)
    Checkpointer(tmp_path / "a", model, opt, dataloader=data, data_rank=(0, 1),
                 extra={"counts": Counts(5)}).save(2)
    model2, opt2, _, data2 = make_run(1)
    counts = Counts(0)
    assert Checkpointer(tmp_path / "a", model2, opt2, dataloader=data2, data_rank=(0, 1),
                        extra={"counts": counts}).load() == 2
    assert data2.state_dict()["position"] == 2 and counts.n == 5
    # another data-parallel degree: the model comes back, the data position does not
    model3, opt3, _, data3 = make_run(2)
    with caplog.at_level(logging.WARNING, logger="emu2_engine.checkpoint.dcp"):
        assert Checkpointer(tmp_path / "a", model3, opt3, dataloader=data3, data_rank=(1, 2)).load() == 2
    assert data3.position == 0 and all(torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))
    assert "not restored: the data position (this rank reads dp1of2, the checkpoint holds dp0of1" in caplog.text
    # saved per rank, loaded per data-parallel rank; an extra entry the checkpoint lacks
    Checkpointer(tmp_path / "b", model, opt, dataloader=data).save(2)
    model4, opt4, _, data4 = make_run(3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emu2_engine.checkpoint.dcp"):
        assert Checkpointer(tmp_path / "b", model4, opt4, dataloader=data4, data_rank=(0, 1),
                            extra={"counts": Counts(0)}).load() == 2
    assert data4.position == 2 and "not restored: 'counts' (not in the checkpoint)" in caplog.text


def test_bad_arguments(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path, model, keep=0)
    with pytest.raises(ValueError, match="dataloader must have state_dict"):
        Checkpointer(tmp_path, model, dataloader=object())
    with pytest.raises(ValueError, match=r"data_rank must be \(dp_rank, dp\)"):
        Checkpointer(tmp_path, model, data_rank=(2, 2))
    with pytest.raises(ValueError, match=r"extra state names \['rng'\]"):
        Checkpointer(tmp_path, model, extra={"rng": Counts(0)})
    with pytest.raises(ValueError, match="step must be >= 0"):
        step_folder(tmp_path, -1)


# DCP's background thread warns that no process group exists: that is the point here.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_snapshots_the_state(tmp_path):
    """The checkpoint holds the values at save() time although training goes on at once; it is
    published (renamed) when written, the next save waits for it, keep-K applies."""
    model, opt, sched, data = make_run(0)
    train_step(model, opt, sched, data)
    ck = Checkpointer(tmp_path, model, opt, scheduler=sched, dataloader=data, async_save=True, keep=2)
    at_save = [p.detach().clone() for p in model.parameters()]
    ck.save(1)
    with torch.no_grad():  # training moves on while the write may still be running
        for p in model.parameters():
            p.add_(1.0)
    ck.save(2)  # waits for step 1 first
    ck.save(3)
    ck.wait()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3]
    assert not list(tmp_path.glob("*.tmp"))

    for step, want in ((2, [p.detach() for p in model.parameters()]), (3, None)):
        fresh = make_run(5)
        assert Checkpointer(tmp_path, fresh[0], fresh[1]).load(step) == step
        for p, q in zip(want or model.parameters(), fresh[0].parameters()):
            assert torch.equal(p, q)
    # Step 1 (deleted by keep=2) held the values before the in-place update.
    first = make_run(5)
    ck1 = Checkpointer(tmp_path / "one", model, async_save=True)
    with torch.no_grad():
        for p, v in zip(model.parameters(), at_save):
            p.copy_(v)
    ck1.save(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)
    ck1.wait()
    assert Checkpointer(tmp_path / "one", first[0]).load() == 1
    for v, q in zip(at_save, first[0].parameters()):
        assert torch.equal(v, q)


# ----------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo ranks
# ----------------------------------------------------------------------------------------------
def _sharded_run(seed: int, mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt, TinyLoader(100 + dist.get_rank())  # each rank reads its own data


def _sharded_step(model, opt, loader) -> float:
    x, _ = loader.next()
    x = torch.cat([x, x[:, :2]], dim=1)  # 8 features
    loss = (model(x) - x[:, :4].cos()).square().mean() * (1.0 + 0.01 * random.random())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _fsdp_worker(rank: int, world: int, init_file: str, directory: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        seed_everything(rank)
        model, opt, data = _sharded_run(0, mesh)
        for p in model.parameters():  # really sharded: each rank holds half the rows
            assert isinstance(p, DTensor) and p.to_local().shape[0] == p.shape[0] // world
        ck = Checkpointer(directory, model, opt, dataloader=data, keep=2)
        for _ in range(2):
            _sharded_step(model, opt, data)
        ck.save(2)
        straight = [_sharded_step(model, opt, data) for _ in range(2)]

        seed_everything(50 + rank)
        model2, opt2, data2 = _sharded_run(9, mesh)
        assert Checkpointer(directory, model2, opt2, dataloader=data2).load() == 2
        assert data2.position == 2
        assert [_sharded_step(model2, opt2, data2) for _ in range(2)] == straight

        # Asynchronous save of the sharded state: what the next process loads must be the
        # state at save() time.
        ck_async = Checkpointer(directory, model2, opt2, dataloader=data2, keep=2, async_save=True)
        ck_async.save(4)
        full = {k: v.full_tensor().clone() for k, v in model2.state_dict().items()}
        _sharded_step(model2, opt2, data2)
        ck_async.wait()
        if rank == 0:
            torch.save({"full": full, "steps": [s for s, _ in complete_checkpoints(directory)]}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_save_and_load_on_two_gloo_ranks(tmp_path, caplog):
    """Two ranks, FSDP2: save the shards, reload into a differently initialised sharded model,
    identical next losses on both ranks; an async save; then one process loads the 2-rank
    checkpoint into a plain model (DCP reshards) and is told the RNG/loader are not restored."""
    directory, out = tmp_path / "ckpt", tmp_path / "full.pt"
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(directory), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert result["steps"] == [2, 4]

    plain = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="emu2_engine.checkpoint.dcp"):
        assert Checkpointer(directory, plain, opt).load() == 4
    assert "not restored: the RNG states (saved by 2 ranks, loaded by 1)" in caplog.text
    for name, value in plain.state_dict().items():
        assert torch.equal(value, result["full"][name]), name
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in plain.parameters())


def _partial_load_worker(rank: int, init_file: str, folder: str, out: str) -> None:
    from datetime import timedelta

    from emu2_engine.checkpoint.dcp import load_model_weights

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:  # rank 0 holds a part the checkpoint has; rank 1 a part it lacks (a deeper stage)
        model = nn.Sequential(nn.Linear(4, 4)) if rank == 0 else nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        try:
            load_model_weights(folder, model, strict=False)
            result = "loaded"
        except CheckpointError as e:
            result = str(e)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_loading_model_weights_fail_together(tmp_path):
    """Under torch distributed, a rank whose part of the model the checkpoint lacks must not
    leave the others waiting in DCP's collective load: every rank raises, naming that rank."""
    from emu2_engine.checkpoint.dcp import save_model_weights

    save_model_weights(nn.Sequential(nn.Linear(4, 4)), tmp_path / "weights")
    mp.spawn(_partial_load_worker, args=(str(tmp_path / "init"), str(tmp_path / "weights"), str(tmp_path / "out")),
             nprocs=2, join=True)
    results = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    assert results[1].startswith("checkpoint ") and "missing (2): 1.weight (2, 4), 1.bias (2,)" in results[1]
    assert results[0] == f"rank 1: {results[1]}"


def test_grow_rows_and_which_shapes_may_grow():
    """`grow_rows` appends rows equal to the mean of the saved ones (taken in fp32); `may_grow`
    lets only the row count `grow` names stand in for the model's larger one."""
    from emu2_engine.checkpoint.released import grow_rows, may_grow

    saved = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float16)
    grown = grow_rows(saved, 4)
    assert grown.dtype == torch.float16
    assert torch.equal(grown, torch.tensor([[1.0, 2.0], [3.0, 6.0], [2.0, 4.0], [2.0, 4.0]], dtype=torch.float16))
    assert torch.equal(grow_rows(saved, 2), saved)
    with pytest.raises(ValueError, match=r"expected at most 1 rows, got shape \(2, 2\)"):
        grow_rows(saved, 1)
    grow = {"emb": 5}
    assert may_grow("emb", (5, 4), (7, 4), grow)
    assert not may_grow("emb", (6, 4), (7, 4), grow)  # not the allowed count
    assert not may_grow("emb", (5, 3), (7, 4), grow)  # another width
    assert not may_grow("head", (5, 4), (7, 4), grow) and not may_grow("emb", (5, 4), (7, 4), None)
    assert not may_grow("emb", (5, 4), (5, 4), grow)  # nothing to grow


def _grow_worker(rank: int, init_file: str, folder: str, out: str) -> None:
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from emu2_engine.checkpoint.dcp import load_model_weights

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(1)  # a different start from the saved model's
        model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
        # as the engine splits a vocabulary: by rows over tp (4/3), each part again over dp
        # (FSDP: 2/2 and 2/1 rows), which DTensor describes as a strided shard
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": RowwiseParallel(), "1": ColwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
        load_model_weights(folder, model, grow={"0.weight": 5, "1.weight": 5})
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, out)
    finally:
        dist.destroy_process_group()


def test_sharded_ranks_grow_a_vocabulary_from_a_checkpoint_with_fewer_rows(tmp_path):
    """Four ranks (tp 2 x FSDP 2) load a one-process checkpoint whose vocabulary tensors have
    5 rows into 7-row tensors split unevenly: the 5 saved rows, then their mean, each rank its
    own shard of them."""
    from emu2_engine.checkpoint.dcp import save_model_weights

    torch.manual_seed(0)
    small = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    save_model_weights(small, tmp_path / "weights")
    mp.spawn(_grow_worker, args=(str(tmp_path / "init"), str(tmp_path / "weights"), str(tmp_path / "out.pt")),
             nprocs=4, join=True)
    full = torch.load(tmp_path / "out.pt")
    for name, saved in small.state_dict().items():
        assert torch.equal(full[name][:5], saved), name
        assert torch.allclose(full[name][5:], saved.mean(0).expand(2, -1), rtol=0, atol=1e-7), name


def _tp_fsdp_worker(rank: int, init_file: str, directory: str, one_process: str, out: str) -> None:
    from datetime import timedelta

    from emu2_engine.checkpoint.dcp import load_model_weights
    from emu2_engine.models import Emu2Config, Emu2Model
    from emu2_engine.parallel import ParallelConfig, ParallelDims, parallelize

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4,
                            timeout=timedelta(seconds=90))
    try:
        dims = ParallelDims(tp=2, dp_shard=2)
        torch.manual_seed(0)
        pm = parallelize(Emu2Model(Emu2Config.from_preset("debug")), dims, dims.build_mesh("cpu"),
                         ParallelConfig(param_dtype="float32"))
        model = pm.models[0]

        def full() -> dict[str, torch.Tensor]:
            return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

        qkv = dict(model.named_parameters())["visual.blocks.0.attn.qkv.weight"]
        placements = str(qkv.placements)
        saved = full()
        Checkpointer(directory, model, torch.optim.AdamW(model.parameters())).save(1)
        load_model_weights(one_process, model)
        loaded = full()
        if rank == 0:
            torch.save({"placements": placements, "saved": saved, "loaded": loaded}, out)
    finally:
        dist.destroy_process_group()


def test_tp_x_fsdp_checkpoints_the_vits_strided_qkv(tmp_path):
    """tp 2 x FSDP 2 (the chat and stage recipes' kind of layout): the ViT's fused qkv is split
    by TP with a strided layout and by FSDP on dim 1. Its checkpoint used to fail to save
    (overlapping chunks) and a one-process checkpoint loaded into it put q, k and v rows in
    the wrong places (silently). Now both directions give the exact weights."""
    from emu2_engine.checkpoint.dcp import load_model_weights, save_model_weights
    from emu2_engine.models import Emu2Config, Emu2Model

    torch.manual_seed(1)
    source = Emu2Model(Emu2Config.from_preset("debug"))
    save_model_weights(source, tmp_path / "one")
    mp.spawn(_tp_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path / "ckpt"), str(tmp_path / "one"),
                                    str(tmp_path / "out.pt")), nprocs=4, join=True)
    result = torch.load(tmp_path / "out.pt")
    assert "_StridedShard" in result["placements"] and "Shard(dim=1)" in result["placements"]
    for name, value in source.state_dict().items():
        assert torch.equal(result["loaded"][name], value), name
    plain = Emu2Model(Emu2Config.from_preset("debug"))
    assert load_model_weights(step_folder(tmp_path / "ckpt", 1), plain) == 1
    for name, value in plain.state_dict().items():
        assert torch.equal(value, result["saved"][name]), name
