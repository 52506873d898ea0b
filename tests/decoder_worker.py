"""The distributed half of tests/test_train_decoder.py: two gloo ranks train the decoder with
the UNet sharded by FSDP2, in one process group (spawned, `init_method=file://`).

Each rank runs, one after the other:

1. ``whole``: `STEPS` steps with a held-out evaluation before and after;
2. ``split``: the same run, in which rank 1 sends itself SIGTERM during step 2 (rank 0 is
   never signalled): both ranks must stop after step 2 with a checkpoint (and rank 0 writes
   stopped.json); then a fresh trainer resumes from it and runs step 3;
3. ``video``: two steps of the inflated video UNet on clips (`VIDEO_ARGS`); ``micro``: the
   ``whole`` run with each rank's slice in two micro-batches (gradients reduced once);
4. ``shards``: the image decoder on small shards with bad samples (`write_small_shards`),
   each rank reading its own: 4 steps; then the same run checkpointed at step 2 and killed
   after step 3, and resumed by fresh trainers.

Rank 0 saves what they measured (records, the full UNet parameters gathered from the shards,
how the parameters were laid out, the checkpoints on disk) in OUT_DIR/results.pt.

Also runnable by hand: ``python tests/decoder_worker.py OUT_DIR``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tempfile
from contextlib import redirect_stdout
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from emu2_engine.checkpoint.dcp import complete_checkpoints
from emu2_engine.data.make_shapes import encode_jpeg, write_tar
from emu2_engine.data.shapes import ShapesWorld
from emu2_engine.train.decoder import DecoderJobConfig, DecoderTrainer

WORLD = 2
STEPS = 3
# The tiny debug run: global batch 4 (2 per rank), 32 px images, 3 steps; clipping at 1.0 acts
# (the first norms are ~2), and the learning rate stays above zero (warm-up of one step, decay
# to half) so every step moves the parameters. AdamW's eps is 1e-3 instead of 1e-8: with 1e-8
# the first updates are lr x sign(gradient), and a gradient element near zero whose sign the
# summation order flips can differ by up to 2 lr (we saw 3e-4 against one process, with the
# losses still within 4e-6); with 1e-3 the update is smooth in the gradient, and the check
# "same gradients, same parameters" holds to 1e-7.
ARGS = ["--data.batch_size=4", "--data.image_size=32", f"--train.steps={STEPS}", "--train.log_every=1",
        "--optim.warmup_steps=1", "--optim.min_lr_ratio=0.5", "--optim.eps=1e-3", "--train.eval_batches=1",
        "--train.save_every=100"]

# The video UNet: one 2-frame clip per rank, two steps, no evaluation.
VIDEO_ARGS = ["--model.video=true", "--data.batch_size=2", "--data.frames=2", "--train.steps=2",
              "--train.eval_batches=0"]

# Shards: 2 samples per rank and step, 4 steps, a checkpoint every 2.
SHARD_ARGS = ["--data.image_size=16", "--train.steps=4", "--train.save_every=2", "--train.eval_batches=0"]


def write_small_shards(folder: Path) -> None:
    """Shards of 5, 5 and 1 samples (12 x 10 JPEGs) with 3 bad samples, 8 usable: each bad one
    comes before the good ones of its shard, so reading any good sample of a shard has
    counted that shard's bad ones."""
    world = ShapesWorld(5)
    images = iter(encode_jpeg(world.sample(i, 16).image.resize((12, 10))) for i in range(20))
    folder.mkdir()
    write_tar(folder / "s-0.tar", [("a-bad", {"jpg": b""})] + [(f"a{i}", {"jpg": next(images)}) for i in range(4)])
    write_tar(folder / "s-1.tar", [("b-bad0", {"txt": b"x"}), ("b-bad1", {"jpg": next(images)[:40]}),
                                   ("b0", {"jpg": next(images)}), ("b1", {"jpg": next(images)}),
                                   ("b2", {"jpg": next(images)})])
    write_tar(folder / "s-2.tar", [("c0", {"jpg": next(images)})])


def config(run_dir: Path, *extra: str) -> DecoderJobConfig:
    return DecoderJobConfig.load(None, ARGS + [f"--train.run_dir={run_dir}", *extra])


def full_parameters(trainer: DecoderTrainer) -> dict[str, torch.Tensor]:
    """Every UNet parameter, gathered whole from the shards (a collective: every rank calls it)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in trainer.unet.named_parameters()}


def layout(trainer: DecoderTrainer) -> dict:
    """How this rank holds the parameters: the UNet's as (placements, local shape) and whether
    any frozen encoder or VAE parameter is a DTensor."""
    return {"unet": {n: (tuple(p.placements), tuple(p.to_local().shape)) if isinstance(p, DTensor) else None
                     for n, p in trainer.unet.named_parameters()},
            "frozen_sharded": any(isinstance(p, DTensor) for m in (trainer.encoder, trainer.vae)
                                  for p in m.parameters()),
            "frozen_trainable": any(p.requires_grad for m in (trainer.encoder, trainer.vae)
                                    for p in m.parameters())}


def signal_self_during_step(trainer: DecoderTrainer, step: int) -> None:
    """Make rank 1 send itself SIGTERM while it runs step `step` (1-based)."""
    real = trainer.step

    def step_with_signal():
        if trainer.rank == 1 and trainer.step_count == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real()

    trainer.step = step_with_signal


def run(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A failure on one rank must not leave the other waiting forever.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    out = Path(out_dir)
    whole = DecoderTrainer(config(out / "whole"))
    held = layout(whole)  # as built (after a forward, FSDP2 keeps the root's parameters gathered)
    whole_records = whole.train(progress=False)
    whole_params = full_parameters(whole)

    first = DecoderTrainer(config(out / "split"))
    signal_self_during_step(first, 2)
    printed = io.StringIO()
    with redirect_stdout(printed):
        first_records = first.train(progress=False)
    after_signal = [s for s, _ in complete_checkpoints(out / "split" / "checkpoints")]
    stopped_file = out / "split" / "stopped.json"
    dist.barrier()  # rank 0 has written it (after the save's last barrier)
    stopped = json.loads(stopped_file.read_text()) if stopped_file.exists() else None
    dist.barrier()  # every rank has looked before rank 0's resumed run removes the file
    resumed = DecoderTrainer(config(out / "split"))
    resumed_records = resumed.train(progress=False)
    resumed_params = full_parameters(resumed)
    video_records = DecoderTrainer(config(out / "video", *VIDEO_ARGS)).train(progress=False)
    micro = DecoderTrainer(config(out / "micro", "--train.microbatches=2"))
    micro_records = micro.train(progress=False)
    micro_params = full_parameters(micro)

    if rank == 0:
        write_small_shards(out / "shards")
    dist.barrier()
    shard_args = [*SHARD_ARGS, f"--data.paths={out / 'shards'}"]
    on_shards = DecoderTrainer(config(out / "shards_whole", *shard_args))
    shards_whole = on_shards.train(progress=False)
    DecoderTrainer(config(out / "shards_split", *shard_args)).train(progress=False, stop_at=3)
    shards_resumed = DecoderTrainer(config(out / "shards_split", *shard_args)).train(progress=False)

    result = {"whole": whole_records, "first": first_records, "first_stdout": printed.getvalue(),
              "after_signal": after_signal, "stopped": stopped, "stopped_after_resume": stopped_file.exists(),
              "resumed": resumed_records, "video": video_records, "micro": micro_records, "layout": held,
              "shards_whole": shards_whole, "shards_resumed": shards_resumed,
              "shards_own_skips": dict(on_shards.skip_counts()),
              "world": whole.world, "local_batch": whole.local_batch}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save({"ranks": gathered, "whole_params": whole_params, "resumed_params": resumed_params,
                    "micro_params": micro_params,
                    "checkpoints": [s for s, _ in complete_checkpoints(out / "split" / "checkpoints")]},
                   out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


def launch(out_dir: str) -> dict:
    """Run the two ranks; return rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(os.path.join(tmp, "init"), out_dir), nprocs=WORLD, join=True)
    return torch.load(os.path.join(out_dir, "results.pt"), weights_only=False)


if __name__ == "__main__":
    results = launch(sys.argv[1])
    for rank, r in enumerate(results["ranks"]):
        print(rank, [x.get("loss") for x in r["whole"]], r["after_signal"], r["first_stdout"].strip())
    print("checkpoints", results["checkpoints"])
