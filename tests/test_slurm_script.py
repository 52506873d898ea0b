"""scripts/slurm/pretrain.sbatch run by bash with stand-ins for srun and scontrol: the config
check against the allocation (run for real, with this interpreter), the torchrun command it
builds (the recipe's own layout unless TP/PP/DP_* are set), and its exit status after a
signalled stop (there PYTHON=true stands in for the check)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm" / "pretrain.sbatch"


def _run(tmp_path, srun_body: str, script_args: tuple[str, ...] = (), **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    # scontrol writes its 8 host names one at a time: a reader that stops after the first
    # (head -n 1) would kill it with SIGPIPE, failing the script under pipefail
    hosts = 'for i in 1 2 3 4 5 6 7 8; do echo "node$i"; sleep 0.02; done'
    for name, body in (("srun", srun_body), ("scontrol", hosts)):
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CONFIG": str(REPO / "configs/stage2_37b.toml"),
            "SLURM_NNODES": "8", "SLURM_JOB_NODELIST": "node[1-8]", "SLURM_JOB_NAME": "emu2",
            "SLURM_JOB_ID": "42", "RUN_DIR": str(tmp_path / "run"), "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", str(SCRIPT), *script_args], cwd=tmp_path, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_builds_the_torchrun_command_and_passes_its_status(tmp_path):
    done = _run(tmp_path, 'echo "$@" > args.txt; exit 0')
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args.txt").read_text()
    assert "--nnodes=8 --nproc_per_node=8" in args and "--rdzv_endpoint=node1:29500" in args
    # no TP/PP/DP_* set: the recipe's own layout, no --parallel override
    assert args.split(" -m ")[1].split() == ["emu2_engine.pretrain", "--config", str(REPO / "configs/stage2_37b.toml"),
                                             f"--train.run_dir={tmp_path / 'run'}"]
    failed = _run(tmp_path, "exit 3", PYTHON="true")
    assert failed.returncode == 3  # a failure stays a failure


@pytest.mark.parametrize("recipe", ["stage1_37b", "chat_37b"])
def test_each_recipes_own_layout_stands_when_no_degree_is_set(tmp_path, recipe):
    """stage1_37b (tp 4, pp 1, 4 x 4 HSDP) and chat_37b (tp 2, pp 4, 2 x 4 HSDP) differ from
    stage2's layout: without TP/PP/DP_* the script passes no --parallel override."""
    done = _run(tmp_path, 'echo "$@" > args.txt; exit 0', CONFIG=str(REPO / f"configs/{recipe}.toml"))
    assert done.returncode == 0, done.stderr
    assert "--parallel." not in (tmp_path / "args.txt").read_text()


def test_only_the_degrees_set_are_overridden(tmp_path):
    """stage2_37b is tp 4, pp 2, dp_shard 8; TP=2 DP_SHARD=16 keep its pp and dp_replicate,
    and the script's own arguments follow (the recipe's global batch of 2048 rows then needs
    128 micro-batches per step instead of 256, which the check says)."""
    extra = ["--parallel.microbatches=128", "--parallel.activation_checkpoint=selective"]
    done = _run(tmp_path, 'echo "$@" > args.txt; exit 0', script_args=extra, TP="2", DP_SHARD="16")
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args.txt").read_text().split()
    assert [a for a in args if a.startswith("--parallel.")] == ["--parallel.tp=2", "--parallel.dp_shard=16", *extra]
    same_batch = _run(tmp_path, "exit 0", TP="2", DP_SHARD="16")
    assert same_batch.returncode == 2 and "set parallel.microbatches = 128" in same_batch.stderr


@pytest.mark.parametrize("saved", [True, False])
def test_signalled_stop_exits_0_only_with_a_complete_checkpoint(tmp_path, saved):
    """torchrun exits 1 after forwarding SIGTERM: the job succeeds when the trainer wrote
    stopped.json (its checkpoint is complete), and fails otherwise."""
    body = ('echo \'{"step": 7, "reason": "received SIGTERM"}\' > "$RUN_DIR/stopped.json"; exit 1' if saved
            else "exit 1")
    done = _run(tmp_path, body, PYTHON="true")  # no config check: see the tests above
    assert done.returncode == (0 if saved else 1), done.stderr
    assert ("stopped by a signal after a complete checkpoint" in done.stdout) == saved


def test_refuses_a_layout_that_does_not_fill_the_gpus(tmp_path):
    """The resolved config is checked against the allocation before torchrun starts."""
    done = _run(tmp_path, "touch started; exit 0", PP="4")
    assert done.returncode == 2 and not (tmp_path / "started").exists()
    assert done.stderr.strip().splitlines() == [
        "pretrain.sbatch: parallel degrees dp_replicate x dp_shard x tp x pp = 1 x 8 x 4 x 4 = 128 "
        "must equal the world size 64 (the layout is the config's [parallel] section, with TP, PP, "
        "DP_SHARD, DP_REPLICATE overriding the degrees set; 64 GPUs)"]
    more_nodes = _run(tmp_path, "exit 0", SLURM_NNODES="16")  # the recipe is laid out for 64
    assert more_nodes.returncode == 2 and "= 64 must equal the world size 128" in more_nodes.stderr


def test_a_stale_stop_file_does_not_hide_a_failure(tmp_path):
    """A resubmitted job whose workers fail before training starts: the previous job's
    stopped.json must not turn the failure into a clean stop."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stopped.json").write_text('{"step": 7}\n')
    done = _run(tmp_path, "exit 1", PYTHON="true")
    assert done.returncode == 1 and "stopped by a signal" not in done.stdout
