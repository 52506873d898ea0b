"""`torchrun -m emu2_engine.train_decoder [--config FILE] [--section.key=value ...]`

Trains a visual decoder (the image UNet, or with --model.video=true the inflated video UNet)
to reconstruct images from their Emu2 visual embeddings. With no arguments: the debug UNet on
the shapes world with a tiny random VAE and a random frozen encoder, on the first GPU if there
is one, else on the CPU (configs/decoder_debug.toml equals these defaults); with
`--data.paths=SHARDS` it reads WebDataset shards of images (of clips with --model.video=true)
instead of images made in memory. With `--nproc_per_node=N` the UNet is sharded over the N
ranks (FSDP2), data.batch_size, the global batch, is split among them, and each rank reads its
own shards. A run resumes from its newest checkpoint and stops cleanly on SIGTERM/SIGINT,
writing run_dir/stopped.json (docs/decoders.md).
"""

from __future__ import annotations

import sys
from collections import Counter

from emu2_engine.data.records import SkipStats
from emu2_engine.pretrain import one_line, say_input_error
from emu2_engine.train.config import parse_run_args
from emu2_engine.train.decoder import DecoderJobConfig


def parse_args(argv: list[str] | None = None) -> tuple[DecoderJobConfig, bool]:
    """The resolved config, and whether to show the progress bar."""
    return parse_run_args(argv, DecoderJobConfig, "torchrun -m emu2_engine.train_decoder",
                          "Train an Emu2 visual decoder (image autoencoding, or video). Any config value "
                          "can be overridden with --section.key=value (for example --train.steps=50).",
                          "configs/decoder_*.toml")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when the run finished or was stopped by SIGTERM/SIGINT (with a
    checkpoint), 1 when train.max_nonfinite steps in a row had a non-finite gradient norm,
    2 for a config or an input that cannot work, found before training or once it starts (a
    checkpoint that is corrupt or of another model, a shard position saved over other shards,
    held-out shards with too few usable samples), said in one line on stderr. Under torchrun
    only rank 0 prints the run's progress and summary; an error is said by every rank that
    meets it."""
    try:
        cfg, progress = parse_args(argv)
    except (ValueError, OSError) as e:
        print(f"train_decoder: {one_line(e)}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from emu2_engine.train.decoder import DecoderTrainer
    from emu2_engine.train.trainer import NonFiniteError

    try:
        try:
            trainer = DecoderTrainer(cfg)
        except (ValueError, OSError) as e:  # a config only the world size rules out, a path
            print(f"train_decoder: {one_line(e)}", file=sys.stderr)
            return 2
        try:
            records = trainer.train(progress=progress)
        except NonFiniteError as e:
            print(f"train_decoder: {one_line(e)}", file=sys.stderr)
            return 1
        # a checkpoint that is corrupt or of another model, held-out shards with too few usable
        # samples (found at the first evaluation), ...: one line (with the traceback first for
        # errors that may be bugs)
        except (ValueError, OSError) as e:
            say_input_error("train_decoder", e)
            return 2
        if trainer.rank == 0 and trainer.step_count == cfg.train.steps:
            report(trainer, records)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def report(trainer, records: list[dict]) -> None:
    """The end-of-run summary (a run stopped by a signal has said where its checkpoint is)."""
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "heldout_loss" in r]
    if steps:
        print(f"done: step {steps[-1]['step']}, loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}; "
              f"metrics in {trainer.run_dir}/metrics.jsonl, checkpoints in {trainer.checkpoint_dir}")
    else:
        print(f"done: the run was already complete at step {trainer.step_count} "
              f"(checkpoints in {trainer.checkpoint_dir})")
    skipped = [r["skipped"] for r in steps if "skipped" in r]
    if skipped:  # a run on shards: the totals of every rank
        print(f"data: {SkipStats(Counter(skipped[-1])).summary()}")
    if len(evals) == 2:
        print(f"held-out denoising loss: {evals[0]['heldout_loss']:.4f} -> {evals[1]['heldout_loss']:.4f} "
              f"(with another sample's embeddings: {evals[1]['heldout_loss_wrong_cond']:.4f})")
    elif evals and evals[-1]["step"] == trainer.step_count and trainer.step_count > 0:
        # a resumed run: the first evaluation was its first part's
        print(f"held-out denoising loss at the end: {evals[-1]['heldout_loss']:.4f} "
              f"(with another sample's embeddings: {evals[-1]['heldout_loss_wrong_cond']:.4f})")


if __name__ == "__main__":
    sys.exit(main())
