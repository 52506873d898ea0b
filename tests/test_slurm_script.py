"""scripts/slurm/pretrain.sbatch run by bash with stand-ins for srun and scontrol: the layout
check, the torchrun command it builds, and its exit status after a signalled stop."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm" / "pretrain.sbatch"


def _run(tmp_path, srun_body: str, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    # scontrol writes its 8 host names one at a time: a reader that stops after the first
    # (head -n 1) would kill it with SIGPIPE, failing the script under pipefail
    hosts = 'for i in 1 2 3 4 5 6 7 8; do echo "node$i"; sleep 0.02; done'
    for name, body in (("srun", srun_body), ("scontrol", hosts)):
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CONFIG": "configs/stage2_37b.toml",
            "SLURM_NNODES": "8", "SLURM_JOB_NODELIST": "node[1-8]", "SLURM_JOB_NAME": "emu2",
            "SLURM_JOB_ID": "42", "RUN_DIR": str(tmp_path / "run")}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_builds_the_torchrun_command_and_passes_its_status(tmp_path):
    done = _run(tmp_path, 'echo "$@" > args.txt; exit 0')
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args.txt").read_text()
    assert "--nnodes=8 --nproc_per_node=8" in args and "--rdzv_endpoint=node1:29500" in args
    assert "--parallel.tp=4 --parallel.pp=2 --parallel.dp_shard=8 --parallel.dp_replicate=1" in args
    failed = _run(tmp_path, "exit 3")
    assert failed.returncode == 3  # a failure stays a failure


@pytest.mark.parametrize("saved", [True, False])
def test_signalled_stop_exits_0_only_with_a_complete_checkpoint(tmp_path, saved):
    """torchrun exits 1 after forwarding SIGTERM: the job succeeds when the trainer wrote
    stopped.json (its checkpoint is complete), and fails otherwise."""
    body = ('echo \'{"step": 7, "reason": "received SIGTERM"}\' > "$RUN_DIR/stopped.json"; exit 1' if saved
            else "exit 1")
    done = _run(tmp_path, body)
    assert done.returncode == (0 if saved else 1), done.stderr
    assert ("stopped by a signal after a complete checkpoint" in done.stdout) == saved


def test_refuses_a_layout_that_does_not_fill_the_gpus(tmp_path):
    done = _run(tmp_path, "exit 0", TP="3")
    assert done.returncode == 2 and "!= 64 GPUs" in done.stderr


def test_a_stale_stop_file_does_not_hide_a_failure(tmp_path):
    """A resubmitted job whose workers fail before training starts: the previous job's
    stopped.json must not turn the failure into a clean stop."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stopped.json").write_text('{"step": 7}\n')
    done = _run(tmp_path, "exit 1")
    assert done.returncode == 1 and "stopped by a signal" not in done.stdout
