"""Convert between the released Emu2 weights and engine checkpoints.

    python -m emu2_engine.convert --preset emu2-37b --from /ckpt/Emu2 --to emu2-37b.pt
    python -m emu2_engine.convert --preset emu2-37b --export --from emu2-37b.pt --to /out/Emu2
    python -m emu2_engine.convert --preset emu2-37b --from /ckpt/Emu2 --to /ckpt/emu2-37b-dcp

The last writes a checkpoint folder (DCP) that a run starts from with `checkpoint.init_from`
in any parallel layout.

An engine checkpoint is, for now, the engine's state dict: `torch.save`d in a .pt/.pth file,
or a .safetensors file. Both directions go through an `Emu2Model` of the preset, so every key
and shape is checked against the architecture; the model is built on the meta device and
materialised uninitialised (`to_empty`), since every weight is overwritten by the load.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from emu2_engine.checkpoint.released import (
    DEFAULT_SHARD_BYTES,
    TORCH_SUFFIXES,
    atomic_path,
    export_released_weights,
    load_released_weights,
    load_weights,
    write_safetensors,
)
from emu2_engine.checkpoint.dcp import save_model_weights
from emu2_engine.cli import ArgumentParser
from emu2_engine.models import PRESETS, Emu2Config, Emu2Model
from emu2_engine.pretrain import one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENGINE_SUFFIXES = (".pt", ".pth", ".safetensors")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '512MiB' -> 512 * 2**20, '1000' -> 1000 (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or int(float(m.group(1)) * _UNITS[m.group(2).lower()]) < 1:
        raise argparse.ArgumentTypeError(f"not a size of at least one byte: {text!r} (examples: 5GB, "
                                         f"512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def empty_model(preset: str, dtype: torch.dtype) -> Emu2Model:
    """An `Emu2Model` of `preset` on the CPU with uninitialised weights (to be loaded)."""
    with torch.device("meta"):
        model = Emu2Model(Emu2Config.from_preset(preset)).to(dtype)
    model.to_empty(device="cpu")
    return model


def save_engine_checkpoint(model: Emu2Model, path: Path) -> None:
    """The engine state dict as a .pt/.pth (`torch.save`) or .safetensors file, written atomically."""
    if path.suffix == ".safetensors":
        write_safetensors(model.state_dict(), path)
        return
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m emu2_engine.convert",
        description="Convert released Emu2 weights to an engine checkpoint, or (--export) an engine "
                    "checkpoint to the released native layout (decoder.lm.* names, safetensors). "
                    "An engine checkpoint is the engine's state dict, torch.save'd in a .pt/.pth "
                    "file or written as a .safetensors file (chosen by DST's suffix).")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="model preset whose architecture the weights must match")
    p.add_argument("--from", dest="src", required=True, type=Path,
                   help="import: released weights (a .safetensors/.bin/.pt/.pth file, or a directory "
                        "with a sharded checkpoint and its index json; Emu2, Emu2-Chat, Emu2-Gen, "
                        "Hugging Face layouts); --export: an engine checkpoint (.pt/.pth/.safetensors)")
    p.add_argument("--to", dest="dst", required=True, type=Path,
                   help="import: the engine checkpoint to write (.pt/.pth or .safetensors), or a "
                        "new folder name without a suffix for a checkpoint folder (DCP) that a "
                        "run's checkpoint.init_from loads in any parallel layout; "
                        "--export: a .safetensors file, or a directory for a sharded checkpoint "
                        "with model.safetensors.index.json")
    p.add_argument("--export", action="store_true",
                   help="engine checkpoint -> released layout (default: released -> engine)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the written tensors; the whole model is held in memory in it "
                        "(37B parameters: 148 GB in float32, 74 GB in bfloat16); default float32")
    p.add_argument("--shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="--export to a directory: largest shard, e.g. 5GB or 512MiB "
                        f"(default {DEFAULT_SHARD_BYTES // 10**9}GB)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size is not None and not args.export:
        parser.error("--shard-size applies to --export only")
    engine_path = args.src if args.export else args.dst
    to_folder = not args.export and args.dst.suffix == ""
    if not to_folder and engine_path.suffix not in ENGINE_SUFFIXES:
        parser.error(f"engine checkpoint {engine_path} must end in one of {', '.join(ENGINE_SUFFIXES)}"
                     + ("" if args.export else " (or be a folder name without a suffix)"))
    if to_folder and args.dst.exists():  # before reading tens of GB of weights
        parser.error(f"{args.dst} exists: a checkpoint folder is written to a new name")
    if args.export and args.dst.suffix in TORCH_SUFFIXES:
        parser.error(f"--export writes the released layout as a .safetensors file or a folder of "
                     f"shards, not a {args.dst.suffix} file: got --to {args.dst}")
    if args.export and args.dst.suffix == ".safetensors" and args.shard_size is not None:
        parser.error("--shard-size needs a directory for --to, not a .safetensors file")

    model = empty_model(args.preset, DTYPES[args.dtype])
    try:
        if args.export:
            load_weights(model, args.src)
            export_released_weights(model, args.dst, args.shard_size)
        else:
            report = load_released_weights(model, args.src)
            if to_folder:
                save_model_weights(model, args.dst)
            else:
                save_engine_checkpoint(model, args.dst)
            if report.ignored_keys:
                print(f"ignored {len(report.ignored_keys)} keys (rotary buffers, Emu2-Gen decoder, ...)")
    except (OSError, ValueError, SafetensorError) as e:  # a path, weights that do not fit, a bad file
        print(f"convert: error: {one_line(e)}", file=sys.stderr)
        return 1
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {args.dst} ({n / 1e6:.1f}M parameters, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
