"""`torchrun -m emu2_engine.pretrain [--config FILE] [--section.key=value ...]`

With no arguments: the debug preset on the shapes-world shards (generated on first use into
`data.cache_dir`), on the first GPU if there is one, else on the CPU, for the steps in
configs/debug.toml's defaults. With `--nproc_per_node=N` the ranks split the work as
[parallel] says (its degrees must multiply to N x nodes). A run resumes from its newest
checkpoint, stops cleanly on SIGTERM/SIGINT, and writes metrics to <run_dir>/metrics.jsonl
(docs/training.md).
"""

from __future__ import annotations

import sys
import traceback

from emu2_engine.train.config import JobConfig, parse_run_args


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, bool]:
    """The resolved config, and whether to show the progress bar."""
    return parse_run_args(argv, JobConfig, "torchrun -m emu2_engine.pretrain",
                          "Train an Emu2-style model. Any config value can be overridden with "
                          "--section.key=value (for example --train.steps=50 --optim.lr=1e-3).",
                          "configs/*.toml")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when the run finished or was stopped by a signal (with a checkpoint),
    1 when it stopped on non-finite losses, 2 for a config or an input that cannot work (found
    before training or once it starts: a checkpoint that is missing or does not fit the model,
    data or metrics files that cannot be read), said in one line on stderr."""
    try:
        cfg, progress = parse_args(argv)
    except (ValueError, OSError) as e:
        print(f"pretrain: {one_line(e)}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from emu2_engine.train.trainer import NonFiniteError, Trainer

    try:
        try:
            trainer = Trainer(cfg)
        except (ValueError, OSError) as e:  # a config only the world size rules out, a path
            print(f"pretrain: {one_line(e)}", file=sys.stderr)
            return 2
        try:
            records = trainer.train(progress=progress)
        except NonFiniteError as e:
            print(f"pretrain: {one_line(e)}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as e:
            say_input_error("pretrain", e)
            return 2
        if trainer.rank == 0:
            report(trainer, records)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def say_input_error(prog: str, error: BaseException) -> None:
    """An error raised once a run has started, in one line on stderr. The engine's errors for
    bad input (a checkpoint that is missing, incomplete or of another model, weights that do
    not fit, data that gives no sample, a folder that cannot be written, a corrupt metrics
    file) and the system's errors about a named file need nothing more; any other error may be
    a bug, so its traceback comes first."""
    from emu2_engine.checkpoint.dcp import CheckpointError
    from emu2_engine.checkpoint.released import WeightsError
    from emu2_engine.data.shards import DataError
    from emu2_engine.train.metrics import MetricsFileError
    from emu2_engine.train.paths import FolderError

    said = (CheckpointError, WeightsError, DataError, FolderError, MetricsFileError)
    if not (isinstance(error, said) or (isinstance(error, OSError) and error.filename is not None)):
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prog}: {one_line(error)}", file=sys.stderr)


def one_line(error: BaseException) -> str:
    """The error's message on one line (its lines joined with "; ", or a space after a line
    that ends in a colon: "nothing was loaded: missing (2): ...")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    out = ""
    for line in lines:
        out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out or type(error).__name__


def report(trainer, records: list[dict]) -> None:
    """The end-of-run summary on rank 0."""
    steps = [r for r in records if "loss" in r]
    if trainer.step_count < trainer.cfg.train.steps:
        return  # stopped by a signal: the trainer said where its checkpoint is
    if not steps:
        print(f"done: the run was already complete at step {trainer.step_count} "
              f"(checkpoints in {trainer.checkpointer.directory})")
    else:
        first, last = steps[0], steps[-1]
        mfu = "MFU n/a (no peak rate for this device)" if last["mfu"] is None else f"MFU {last['mfu']:.1%}"
        print(f"done: {last['step']} steps, loss {first['loss']:.3f} -> {last['loss']:.3f}; "
              f"{last['tokens_per_s']:,.0f} tokens/s, {last['images_per_s']:,.0f} images/s, "
              f"{mfu}; metrics in {trainer.run_dir}/metrics.jsonl")
    print(f"data: {trainer.loader.skip_summary()}")
    if "heldout_caption_ce" in records[-1]:
        ev = records[-1]
        print(f"held-out captions: loss {ev['heldout_caption_ce']:.3f} with their own images, "
              f"{ev['heldout_caption_ce_wrong_images']:.3f} with another sample's image")


if __name__ == "__main__":
    sys.exit(main())
