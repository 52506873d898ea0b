"""Import and export of the released Emu2 weights (the native key layout of EMU2_FACTS.md).

The engine's parameter names differ from the released ones only in where the LLM sits:

    engine                      released (native)
    visual.*                    visual.*
    projector.project_up.*      decoder.lm.project_up.*
    llm.embed_tokens.*          decoder.lm.model.embed_tokens.*
    llm.layers.{i}.*            decoder.lm.model.layers.{i}.*
    llm.norm.*                  decoder.lm.model.norm.*
    lm_head.*                   decoder.lm.lm_head.*
    project_down.*              decoder.lm.project_down.*

Variants accepted on load: the Hugging Face remote-code release (everything under ``model.``,
the two projections also at the top level, ``project_up.*`` / ``project_down.*``);
a torch file whose top level is ``{"module": {...}}`` (other top-level entries, such as
DeepSpeed's bookkeeping, are ignored); the older names ``vl_adapter.projection`` (project_up)
and ``decoder.lm.stu_regress_head`` (project_down); ``...rotary_emb.inv_freq`` buffers
(ignored: the engine recomputes them); Emu2-Gen files, whose ``multimodal_encoder.*`` part is
loaded while ``unet.*``, ``vae.*`` and ``safety_checker.*`` (the image decoder, not part of
`Emu2Model`) are ignored.

Loading validates first and copies second: every file's keys and shapes are read from headers
(safetensors) or memory-mapped (torch zip files), every mismatch is gathered into one
`WeightsError`, and nothing is written into the model unless everything matches. Tensors are
then copied one at a time, so a sharded safetensors checkpoint never sits in memory whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# (engine prefix, released prefix); the first match wins, so longer prefixes come first.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("visual.", "visual."),
    ("projector.project_up.", "decoder.lm.project_up."),
    ("llm.embed_tokens.", "decoder.lm.model.embed_tokens."),
    ("llm.layers.", "decoder.lm.model.layers."),
    ("llm.norm.", "decoder.lm.model.norm."),
    ("lm_head.", "decoder.lm.lm_head."),
    ("project_down.", "decoder.lm.project_down."),
)
# Older releases' names -> the current released names.
_OLD_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vl_adapter.projection.", "decoder.lm.project_up."),
    ("decoder.lm.stu_regress_head.", "decoder.lm.project_down."),
    # Public copies of the Hugging Face remote code's modeling_emu.py hold the two projections
    # on EmuForCausalLM itself, beside `model`: top-level names (not checked against the
    # released index; accepted either way).
    ("project_up.", "decoder.lm.project_up."),
    ("project_down.", "decoder.lm.project_down."),
)
_GEN_ENCODER = "multimodal_encoder."  # Emu2-Gen: the multimodal model inside the pipeline
_GEN_IGNORED = ("unet.", "vae.", "safety_checker.")  # Emu2-Gen: the image decoder's parts
_HF_PREFIX = "model."  # Hugging Face remote-code release

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
DEFAULT_SHARD_BYTES = 5 * 10**9
"""Shard size when exporting to a directory without one (5 GB, as Hugging Face writes)."""

Shape = tuple[int, ...] | str  # a str describes an entry that is not a tensor

_UMASK = os.umask(0)
os.umask(_UMASK)  # (read at import, before any thread could create a file meanwhile)


class WeightsError(ValueError):
    """The checkpoint's keys or shapes do not match the model; nothing was copied."""

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 wrong_shape: Sequence[str] = ()):
        super().__init__(message)
        self.missing, self.unexpected, self.wrong_shape = list(missing), list(unexpected), list(wrong_shape)


class CorruptCheckpointError(WeightsError):
    """A checkpoint file (or index) could not be parsed: corrupt, truncated or not a checkpoint."""


@dataclass
class LoadReport:
    """What `load_weights` did; with strict=True `missing_keys` and `unexpected_keys` are empty."""

    files: list[Path]
    """Files read, in order."""
    loaded_keys: list[str] = field(default_factory=list)
    """Engine names copied into the model."""
    missing_keys: list[str] = field(default_factory=list)
    """Engine names the checkpoint lacks (left untouched)."""
    unexpected_keys: list[str] = field(default_factory=list)
    """Checkpoint names with no engine parameter."""
    ignored_keys: list[str] = field(default_factory=list)
    """Checkpoint names skipped on purpose (rotary buffers, Emu2-Gen's decoder)."""
    kept_keys: list[str] = field(default_factory=list)
    """Engine names whose checkpoint tensor had another shape and which `keep_fresh` let keep
    their own initialisation (not copied, not an error)."""
    grown_keys: list[str] = field(default_factory=list)
    """Engine names whose checkpoint tensor had the fewer rows `grow` allows: copied into the
    first rows, the rest set by `grow_rows` (also in `loaded_keys`)."""


def grow_rows(saved: torch.Tensor, rows: int) -> torch.Tensor:
    """`saved` (rows first) extended to `rows` rows, each new one the mean of the saved rows:
    how a vocabulary grown by tokens appended at its end starts them (Emu2's 32,272 tokens to
    Emu2-Chat's 32,274 with [USER] and [ASSISTANT]). In the embedding the mean keeps the new
    tokens' inputs inside the distribution the model has seen; in the LM head it gives them the
    average logit, so the other tokens' probabilities barely move (Hewitt, "Initializing New
    Word Embeddings for Pretrained Language Models", 2021). The mean is taken in fp32."""
    if saved.dim() == 0 or rows < saved.shape[0]:
        raise ValueError(f"grow_rows extends a tensor's rows: expected at most {rows} rows, "
                         f"got shape {tuple(saved.shape)}")
    if saved.shape[0] == 0:
        raise ValueError("grow_rows needs at least one saved row to take the mean of")
    extra = saved.float().mean(0, keepdim=True).to(saved.dtype).expand(rows - saved.shape[0], *saved.shape[1:])
    return torch.cat([saved, extra])


def may_grow(name: str, saved: Shape, want: Shape, grow: Mapping[str, int] | None) -> bool:
    """Whether a checkpoint tensor of shape `saved` fills the model's `want` by `grow_rows`:
    `grow` allows `name` exactly that many rows, fewer than the model's, and every other
    dimension matches."""
    return (grow is not None and name in grow and len(saved) == len(want) >= 1
            and saved[0] == grow[name] < want[0] and tuple(saved[1:]) == tuple(want[1:]))


# -- names ----------------------------------------------------------------------------------
def to_engine_name(released_name: str) -> str | None:
    """Engine parameter name of a released key; None for keys that are ignored on purpose.

    Raises KeyError for a name that is neither an Emu2 weight nor an ignored one.
    """
    name = released_name
    if name.startswith(_GEN_ENCODER):
        name = name[len(_GEN_ENCODER):]
    elif name.startswith(_GEN_IGNORED):
        return None
    if name.startswith(_HF_PREFIX):
        name = name[len(_HF_PREFIX):]
    if name.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in _OLD_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for engine, released in _PREFIXES:
        if name.startswith(released):
            return engine + name[len(released):]
    raise KeyError(f"{released_name!r} is not a released Emu2 weight name")


def to_released_name(engine_name: str) -> str:
    """Native released key of an engine parameter name; KeyError for names outside the model."""
    for engine, released in _PREFIXES:
        if engine_name.startswith(engine):
            return released + engine_name[len(engine):]
    raise KeyError(f"{engine_name!r} is not an Emu2Model parameter name")


# -- reading --------------------------------------------------------------------------------
class _SafetensorsFile:
    """Shapes from the header at open; tensors read one at a time later."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                self.shapes: dict[str, Shape] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except SafetensorError as e:
            raise CorruptCheckpointError(f"{path}: not a readable safetensors file (corrupt or "
                                         f"truncated): {e}") from e
        self.ignored: list[str] = []

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)


class _TorchFile:
    """A `torch.save`d dict of tensors, read with weights_only=True (memory-mapped when the file
    is in the zip format, so shapes are known without reading the data)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # torch.load on bad bytes raises many types (pickle, zip, OS errors)
            raise CorruptCheckpointError(
                f"{path}: torch.load(weights_only=True) failed; the file is corrupt or truncated, "
                f"or holds objects other than tensors: {type(e).__name__}: {e}") from e
        self.ignored = []
        if isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
            self.ignored = [k for k in obj if k != "module"]
            obj = obj["module"]
        if not isinstance(obj, Mapping):
            raise CorruptCheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
        self.tensors = obj
        self.shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else f"<{type(v).__name__}>"
                       for k, v in obj.items()}

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.tensors[name]


_File = _SafetensorsFile | _TorchFile


def _open_file(path: Path) -> _File:
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return _TorchFile(path)
    raise WeightsError(f"{path}: unsupported checkpoint file type; expected .safetensors or one of "
                       f"{', '.join(TORCH_SUFFIXES)}")


def _open_sharded(index_path: Path) -> list[_File]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{index_path}: not a valid checkpoint index (needs a "
                                     f"'weight_map' object): {type(e).__name__}: {e}") from e
    shard_names = list(dict.fromkeys(weight_map.values()))
    absent = [s for s in shard_names if not (index_path.parent / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{index_path} names {len(absent)} shard(s) that do not exist in "
                                f"{index_path.parent}: {absent[:5]}")
    files = {s: _open_file(index_path.parent / s) for s in shard_names}
    stray = [(k, s) for k, s in weight_map.items() if k not in files[s].shapes]
    if stray:
        k, s = stray[0]
        raise CorruptCheckpointError(f"{index_path}: {len(stray)} key(s) are not in the shard the "
                                     f"index names, e.g. {k!r} in {s}")
    return list(files.values())


DIFFUSERS_NAMES = ("diffusion_pytorch_model.safetensors.index.json",
                   "diffusion_pytorch_model.bin.index.json",
                   "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
"""What a diffusers model folder (a UNet's `unet/`) holds its weights as, preferred first; the
precision variants (`diffusion_pytorch_model.fp16.safetensors`) are not picked by a folder:
name the file."""


def _open_source(source: Path) -> list[_File]:
    if not source.exists():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if source.is_file():
        return [_open_file(source)]
    for index in (SAFETENSORS_INDEX, BIN_INDEX, *DIFFUSERS_NAMES[:2]):
        if (source / index).is_file():
            return _open_sharded(source / index)
    for single in ("model.safetensors", "pytorch_model.bin", *DIFFUSERS_NAMES[2:]):
        if (source / single).is_file():
            return [_open_file(source / single)]
    raise FileNotFoundError(f"no checkpoint in directory {source}: expected {SAFETENSORS_INDEX}, "
                            f"{BIN_INDEX}, model.safetensors, pytorch_model.bin or diffusers' "
                            f"diffusion_pytorch_model.* (for a precision variant, name the file)")


# -- loading --------------------------------------------------------------------------------
def _fmt_shape(shape: Shape) -> str:
    return shape if isinstance(shape, str) else str(tuple(shape))


def _section(title: str, lines: list[str]) -> str:
    if not lines:
        return ""
    shown = "".join(f"\n    {line}" for line in lines[:5])
    more = f"\n    ... and {len(lines) - 5} more" if len(lines) > 5 else ""
    return f"\n  {title}: {len(lines)}{shown}{more}"


def load_weights(model: nn.Module, source: str | os.PathLike, *,
                 rename: Callable[[str], str | None] | None = None, strict: bool = True,
                 keep_fresh: Callable[[str], bool] | None = None,
                 grow: Mapping[str, int] | None = None) -> LoadReport:
    """Copy the tensors of a checkpoint file or directory into `model`'s state dict.

    `rename` maps a checkpoint key to the model's name (None: ignore the key; KeyError: the key
    is unexpected); None keeps the names as they are (an engine checkpoint). `keep_fresh(name)`
    True lets a model tensor whose checkpoint tensor has another shape keep its own values
    (`LoadReport.kept_keys`) instead of failing the load. Every problem is
    gathered into one `WeightsError` before anything is copied: with strict=True, missing and
    unexpected keys; always, wrong shapes and weights that two checkpoint names map onto. Tensors
    are cast to the dtype of, and copied onto the device of, the model's tensor.

    The copy starts only once every header matched; safetensors checks at open that its header
    covers the file exactly, so the only failure left after that point is an I/O error, which is
    raised as an OSError saying the model is partially loaded.
    """
    source = Path(source)
    files = _open_source(source)
    targets = model.state_dict(keep_vars=True)
    on_meta = [k for k, v in targets.items() if v.is_meta]
    if on_meta:
        raise ValueError(f"{len(on_meta)} model tensors are on the meta device (e.g. {on_meta[0]}); "
                         f"materialise the model with to_empty() before loading weights")
    report = LoadReport(files=[f.path for f in files])
    plan: dict[str, tuple[_File, str]] = {}  # engine name -> (file, checkpoint name)
    unexpected, wrong, duplicate = [], [], []
    for f in files:
        report.ignored_keys += f.ignored
        for name, shape in f.shapes.items():
            try:
                engine = name if rename is None else rename(name)
            except KeyError:
                engine = ""
            if engine is None:
                report.ignored_keys.append(name)
            elif engine not in targets:
                report.unexpected_keys.append(name)
                unexpected.append(f"{name} {_fmt_shape(shape)}")
            elif engine in plan:
                duplicate.append(f"{name}: maps to {engine}, which {plan[engine][1]} already fills")
            else:
                want = tuple(targets[engine].shape)
                if shape != want and keep_fresh is not None and keep_fresh(engine):
                    report.kept_keys.append(engine)
                    continue
                plan[engine] = (f, name)
                if shape != want and may_grow(engine, shape, want, grow):
                    report.grown_keys.append(engine)
                elif shape != want:
                    wrong.append(f"{name}: checkpoint {_fmt_shape(shape)}, model {want} ({engine})")
    report.missing_keys = [k for k in targets if k not in plan and k not in report.kept_keys]
    # Name a missing weight as the checkpoint would: the released name for released weights.
    shown = to_released_name if rename is to_engine_name else str
    missing = [f"{shown(k)} {tuple(targets[k].shape)}" for k in report.missing_keys]
    if wrong or duplicate or (strict and (missing or unexpected)):
        shown_missing, shown_unexpected = (missing, unexpected) if strict else ([], [])
        raise WeightsError(
            f"checkpoint {source} does not match the model; nothing was loaded:"
            + _section("missing", shown_missing) + _section("unexpected", shown_unexpected)
            + _section("wrong shape", wrong) + _section("duplicate", duplicate),
            missing=report.missing_keys, unexpected=report.unexpected_keys, wrong_shape=wrong)

    by_file: dict[int, list[tuple[str, str]]] = {}
    for engine, (f, name) in plan.items():
        by_file.setdefault(id(f), []).append((name, engine))
    with torch.no_grad():
        for f in files:
            pairs = dict(by_file.get(id(f), []))
            try:
                for name, tensor in f.read(list(pairs)):
                    target = targets[pairs[name]]
                    if pairs[name] in report.grown_keys:
                        tensor = grow_rows(tensor, target.shape[0])
                    target.data.copy_(tensor)
                    report.loaded_keys.append(pairs[name])
            except (OSError, SafetensorError, RuntimeError) as e:
                raise OSError(f"reading {f.path} failed after {len(report.loaded_keys)} tensors were "
                              f"copied; the model is partially loaded: {e}") from e
    return report


def holds_released_names(source: str | os.PathLike) -> bool:
    """Whether a weights file or folder names its tensors as the released Emu2 checkpoints do
    (``decoder.lm.*``, ``visual.*``, ...) rather than as the engine's state dict: the first
    name that `to_engine_name` renames says released, the first it does not know says engine.
    Names the two layouts share (``visual.*``) decide nothing: a torch file saved from the
    official model starts with them."""
    for f in _open_source(Path(source)):
        for name in f.shapes:
            try:
                engine = to_engine_name(name)
            except KeyError:
                return False
            if engine is not None and engine != name:
                return True
    return False


def read_tensor(source: str | os.PathLike, name: str, *,
                rename: Callable[[str], str | None] | None = None) -> torch.Tensor:
    """One tensor of a checkpoint file or directory, by its model name (`rename` maps the
    checkpoint's names as in `load_weights`); KeyError when the checkpoint has none."""
    for f in _open_source(Path(source)):
        for stored in f.shapes:
            if (stored if rename is None else rename(stored)) == name:
                return next(iter(f.read([stored])))[1]
    raise KeyError(f"{name!r} is not in checkpoint {source}")


def load_released_weights(model: nn.Module, source: str | os.PathLike, strict: bool = True,
                          grow: Mapping[str, int] | None = None) -> LoadReport:
    """Load released Emu2 weights (any variant in the module docstring) into an `Emu2Model`.

    `source`: a .safetensors file, a .bin/.pt/.pth file (read with weights_only=True), or a
    directory holding model.safetensors.index.json / pytorch_model.bin.index.json with its
    shards, or a single model.safetensors / pytorch_model.bin. Raises FileNotFoundError,
    CorruptCheckpointError or WeightsError (both ValueErrors); the model is unchanged then.
    `grow`: as in `load_weights` (engine names).
    """
    return load_weights(model, source, rename=to_engine_name, strict=strict, grow=grow)


# -- writing --------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside `path`; once the body wrote it, fsync and rename it over
    `path` with the permissions a new file gets under the process's umask. On error the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would make it (safetensors writes 0600)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares storage with nothing (safetensors refuses shared storage)."""
    return t.detach().to("cpu", copy=True).contiguous()


def _plain_all(tensors: Mapping[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """`_plain` only where needed: a CPU tensor that is contiguous, fills its own storage and
    was not seen under another name is written as it is, so exporting a model does not hold a
    second copy of it in memory (148 GB for emu2-37b in fp32)."""
    out, seen = {}, set()
    for name in names:
        t = tensors[name].detach()
        own = (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
               and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        key = t.untyped_storage().data_ptr()
        out[name] = t if own and key not in seen else _plain(t)
        seen.add(key)
    return out


def _is_checkpoint_file(name: str) -> bool:
    return name == SAFETENSORS_INDEX or (name.startswith("model") and name.endswith(".safetensors"))


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      shard_size_bytes: int | None = None) -> Path:
    """Write `tensors` as one .safetensors file, or as a directory of shards plus
    model.safetensors.index.json (when `path` does not end in .safetensors; shards hold at most
    `shard_size_bytes`, default `DEFAULT_SHARD_BYTES`, except a tensor larger than that alone).

    Atomic: a file is written under a temporary name and renamed; a directory is built beside
    `path` and swapped in, replacing an earlier export (a directory holding anything but
    checkpoint files is refused). Only one shard's tensors are copied to the CPU at a time.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if shard_size_bytes is not None:
            raise ValueError(f"{path}: a shard size needs a directory path, not a .safetensors file")
        with atomic_path(path) as tmp:
            save_file(_plain_all(tensors, list(tensors)), str(tmp), metadata={"format": "pt"})
        return path

    limit = DEFAULT_SHARD_BYTES if shard_size_bytes is None else int(shard_size_bytes)
    if limit <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    if path.exists():
        others = [p.name for p in path.iterdir()] if path.is_dir() else [path.name]
        others = [n for n in others if not (path.is_dir() and _is_checkpoint_file(n))]
        if others:
            raise FileExistsError(f"{path} exists and holds files that are not an exported checkpoint "
                                  f"({others[:5]}); refusing to replace it")
    shards: list[list[str]] = [[]]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for stale in (tmp, old):  # left by a run that died with our pid
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map = {}
        for i, names in enumerate(shards):
            shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(_plain_all(tensors, names), str(tmp / shard), metadata={"format": "pt"})
            _fsync(tmp / shard)
            weight_map.update(dict.fromkeys(names, shard))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _fsync(tmp / SAFETENSORS_INDEX)
        replacing = path.exists()
        if replacing:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if replacing:
                os.rename(old, path)
            raise
        _fsync(path.parent)
        if replacing:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_released_weights(model: nn.Module, path: str | os.PathLike,
                            shard_size_bytes: int | None = None) -> Path:
    """Write `model`'s weights in the native released layout (``decoder.lm...`` names) as
    safetensors: one file when `path` ends in .safetensors, else a sharded directory with
    model.safetensors.index.json (see `write_safetensors`). Returns `path`."""
    state = model.state_dict()
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise ValueError(f"{len(on_meta)} model tensors are on the meta device (e.g. {on_meta[0]}); "
                         f"nothing to export")
    return write_safetensors({to_released_name(k): v for k, v in state.items()}, path, shard_size_bytes)
