"""Bad paths and environments given to the trainers: refused in one line before anything is
built or written (a file where a folder goes, shards that are not tar files, a held-out path
that matches nothing, Triton forced on a CPU without the interpreter), and what cannot be
foreseen (a folder the system will not make) refused before the run writes anything."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from emu2_engine import pretrain, train_decoder
from emu2_engine.ops import backend
from emu2_engine.train.config import JobConfig
from emu2_engine.train.paths import FolderError, folder_problem, make_folders

TINY = ["--no-progress", "--train.steps=2", "--optim.warmup_steps=0", "--train.eval_batches=0",
        "--data.prefetch=0", "--metrics.tensorboard=false"]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("key, make_arg", [
    ("train.run_dir", lambda f: [f"--train.run_dir={f}"]),
    ("train.run_dir", lambda f: [f"--train.run_dir={f / 'sub'}"]),
    ("checkpoint.dir", lambda f: [f"--checkpoint.dir={f}"]),
    ("profiling.dir", lambda f: ["--profiling.enable=true", "--profiling.interval=2", f"--profiling.dir={f}"]),
])
def test_a_file_where_a_folder_goes_is_refused_before_anything_is_written(tmp_path, capsys, key, make_arg):
    """A file in the place of a run's folder (or of its parent) was found only when the folder
    was made: the checkpoint folder at the first save, hundreds of steps in; a profile folder
    inside the profiler's hook, whose error then crashed the process (SIGSEGV)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = make_arg(blocker)
    if key != "train.run_dir":
        args.append(f"--train.run_dir={tmp_path / 'run'}")
    before = _files(tmp_path)
    rc = pretrain.main([*TINY, *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"pretrain: {key} = ") and "cannot be a folder" in err, err
    assert _files(tmp_path) == before  # no run folder, config or metrics left behind


def test_folder_problem_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    assert folder_problem(tmp_path / "new" / "deeper", "k") == ""
    assert folder_problem(tmp_path / "f", "k") == f"k = {str(tmp_path / 'f')!r} cannot be a folder: it is a file"
    assert folder_problem(tmp_path / "f" / "g", "k").endswith(f"cannot be a folder: {tmp_path / 'f'} is a file")


def test_make_folders_removes_what_it_made_when_one_cannot_be_made(tmp_path, monkeypatch):
    """A folder the system refuses (seen only when made: /proc/x, a full disk) raises a
    FolderError naming the key, and the folders this call created before it are removed."""
    refused = tmp_path / "refused"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == refused:
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    (tmp_path / "kept").mkdir()
    folders = {"train.run_dir": tmp_path / "run" / "deep", "checkpoint.dir": tmp_path / "kept" / "ck",
               "profiling.dir": refused}
    with pytest.raises(FolderError, match=r"profiling.dir = .* cannot be made a folder: Permission denied"):
        make_folders(folders)
    assert _files(tmp_path) == ["kept"]  # run/, run/deep and kept/ck gone; kept/ was there before


@pytest.mark.parametrize("arg, message", [
    ("--data.heldout_path={missing}", "pretrain: data.heldout_path = '{missing}': no shards: "),
    ("--data.paths=['{text}', '', '']", "pretrain: data.paths[0] (image_text) = '{text}': {text} is not a tar "
                                        "file (WebDataset shards are tar files)"),
])
def test_shards_that_cannot_work_are_refused_at_the_start(tmp_path, capsys, arg, message):
    """A held-out path that matches nothing was found after the whole run had trained (and
    checkpointed); a data path naming a file that is not a tar was found at the first step, as an
    epoch with no usable sample, with a traceback. Both are refused before the model is built."""
    text = tmp_path / "notes.tar"
    text.write_text("not a tar archive")
    names = {"missing": tmp_path / "nothing_here", "text": text}
    rc = pretrain.main([*TINY, f"--train.run_dir={tmp_path / 'run'}", arg.format(**names)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(message.format(**names)), err
    assert not (tmp_path / "run").exists()


def test_triton_forced_on_a_cpu_without_the_interpreter_is_refused_before_the_run(monkeypatch):
    monkeypatch.setattr(backend, "_INTERPRET", False)
    monkeypatch.setenv("EMU2_KERNELS", "auto,spatiotemporal_conv=triton")
    with pytest.raises(ValueError, match="EMU2_KERNELS forces the Triton kernels of spatiotemporal_conv, but "
                                         "this run is on the cpu: set TRITON_INTERPRET=1"):
        backend.check_triton_can_run(torch.device("cpu"))
    backend.check_triton_can_run(torch.device("cuda"))  # (nothing to refuse there)
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    backend.check_triton_can_run(torch.device("cpu"))


def test_a_world_size_that_is_no_number_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    rc = pretrain.main([*TINY, f"--train.run_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("pretrain: the environment's WORLD_SIZE must be a positive "
                                               "integer (torchrun sets it), got 'abc'")


def test_a_leading_tilde_is_the_home_folder(monkeypatch, tmp_path):
    """"~/runs/x" was a folder named "~" in the working directory (inviting `rm -rf ~`)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = JobConfig.load(None, ["--train.run_dir=~/runs/x", "--checkpoint.dir=~/ck",
                                "--data.paths=['~/shards/{00..01}.tar', '', '']"])
    assert cfg.train.run_dir == str(tmp_path / "runs" / "x") and cfg.checkpoint.dir == str(tmp_path / "ck")
    assert cfg.data.paths == [str(tmp_path / "shards" / "{00..01}.tar"), "", ""]
    assert cfg.data.cache_dir == "~/.cache/emu2_engine"  # expanded where used; saved as written
    assert cfg.checkpoint.resume == "auto"


def test_a_profile_window_that_cannot_be_written_warns_and_the_run_goes_on(tmp_path):
    """An error raised in the profiler's trace-ready hook left the profiler in a state whose
    stop() killed the process with SIGSEGV: the hook now warns instead."""
    from emu2_engine.train.profiling import StepProfiler

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    profiler = StepProfiler(1, 1, 0, blocker / "profile", 0, torch.device("cpu"), 0)
    profiler.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            torch.ones(4).sum()
            profiler.step(step)
        profiler.stop()
    said = [str(w.message) for w in caught if "profiling:" in str(w.message)]
    assert said and said[0].startswith("profiling: the window ending at step 1 was not written:"), said
    assert profiler.windows == []


@pytest.mark.parametrize("args, expected", [
    (["--data.seed=-1"], "data.seed must lie in [0, 2**63), got -1"),
    (["--model.vae="], "model.vae = '': names nothing (expected a diffusers AutoencoderKL folder"),
    (["--model.vae={empty}"], "model.vae = '{empty}': has no config.json (expected a diffusers"),
    # the tiny VAE halves twice: 18 px images would come back as 16 px reconstructions
    (["--data.image_size=18"], "data.image_size (18) must be a multiple of the VAE's downsampling factor "
                               "(4, model.vae = 'tiny-random'): its latents would decode to 16 px"),
    (["--train.steps=0"], "train.steps must be positive, got 0"),
])
def test_decoder_input_that_cannot_work_is_one_line(tmp_path, capsys, args, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = train_decoder.main(["--no-progress", "--train.steps=2", "--optim.warmup_steps=0",
                             "--train.eval_batches=0", "--data.batch_size=2", f"--train.run_dir={tmp_path / 'run'}",
                             *(a.format(empty=empty) for a in args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("train_decoder: " + expected.format(empty=empty)), err
    assert not (tmp_path / "run").exists()


def test_convert_refuses_what_it_cannot_write_in_one_line(tmp_path, capsys):
    from emu2_engine import convert

    with pytest.raises(SystemExit):  # argparse: exit 2 with its usage
        convert.main(["--preset", "debug", "--export", "--from", str(tmp_path / "w.pt"),
                      "--to", str(tmp_path / "out.pt")])
    assert "--export writes the released layout as a .safetensors file or a folder of shards, not a .pt" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main(["--preset", "debug", "--export", "--from", str(tmp_path / "w.pt"),
                      "--to", str(tmp_path / "out"), "--shard-size", "0.1"])
    assert "not a size of at least one byte: '0.1'" in capsys.readouterr().err
    bad = tmp_path / "weights.txt"
    bad.write_text("x")
    assert convert.main(["--preset", "debug", "--from", str(bad), "--to", str(tmp_path / "o.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"convert: error: {bad}: unsupported checkpoint file type; expected .safetensors or one of " \
                  f".bin, .pt, .pth"
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["weights.txt"]


def test_weights_written_atomically_get_the_umask_permissions(tmp_path):
    """safetensors creates its files 0600: an exported checkpoint was unreadable by the other
    users of a shared cluster. The atomic writer gives the final file what open() would."""
    from emu2_engine.checkpoint.released import write_safetensors

    path = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.ones(2)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    bad = tmp_path / "run.toml"
    bad.write_bytes(b"[train]\nsteps = \xff\xfe\n")
    with pytest.raises(ValueError, match=f"config file {bad} is not valid TOML: .*codec can't decode"):
        JobConfig.load(bad)


def test_text_is_no_regression_target():
    with pytest.raises(ValueError, match="data.regress lists text, whose samples hold no image to regress"):
        JobConfig.load(None, ["--data.regress=['text']"])


@pytest.mark.parametrize("module, args", [
    ("emu2_engine.plan", ["--gpus", "0"]),
    ("emu2_engine.plan", ["--gpus", "eight"]),
    ("emu2_engine.convert", ["--preset", "debug"]),
    ("emu2_engine.pretrain", ["train.steps=3"]),
])
def test_a_bad_command_line_is_one_line_without_the_usage_block(capsys, module, args):
    """argparse printed its usage block (5-6 lines for plan and convert) before the error."""
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ": error: " in err and err.rstrip().endswith("(see --help)"), err
