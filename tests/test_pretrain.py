"""The default pretrain run, its config handling and its optimiser."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu2_engine import pretrain
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.train.config import JobConfig, OptimSection
from emu2_engine.train.optim import build_optimizer, lr_factor

REPO = Path(__file__).resolve().parent.parent


def test_default_pretrain_30_steps_loss_goes_down(tmp_path, capsys):
    rc = pretrain.main(["--no-progress", "--train.steps=30", "--metrics.log_interval=1",
                        "--train.eval_batches=2", f"--train.run_dir={tmp_path}"])
    assert rc == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records, data, final = lines[:-2], lines[-2], lines[-1]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert data == {"step": 30, "skipped": {}, "truncated": 0}  # the shapes world has no bad samples
    assert final["step"] == 30 and math.isfinite(final["heldout_caption_ce"])
    assert math.isfinite(final["heldout_caption_ce_wrong_images"])
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # From about ln(784) = 6.7 (uniform over the vocabulary) to well below it.
    assert first > 4.0 and last < 0.6 * first, (first, last)
    assert records[-1]["tokens_per_s"] > 0 and records[-1]["images_per_s"] > 0
    assert records[-1]["mfu"] is None  # no peak rate for a CPU
    resolved = JobConfig.load(tmp_path / "config.toml")
    assert resolved.train.steps == 30 and resolved.model.preset == "debug"
    out = capsys.readouterr().out
    assert "done: 30 steps" in out and "held-out captions: loss" in out
    assert "data: no samples skipped; 0 samples truncated to fit" in out


def test_image_check_is_skipped_for_real_shards_without_heldout_path(tmp_path, capsys):
    """With every dataset read from named shards and no held-out shards named, the end-of-run
    image check would read the shapes world, a different world: it is skipped and says so."""
    from emu2_engine.data.loader import shapes_world_root

    data = JobConfig.load(None).data
    root = shapes_world_root(data)
    paths = ",".join(f'"{root / kind / "train"}"' for kind in data.datasets)
    rc = pretrain.main(["--no-progress", "--train.steps=2", "--optim.warmup_steps=0",
                        "--train.eval_batches=2", f"--data.paths=[{paths}]",
                        f"--train.run_dir={tmp_path}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "end-of-run image check skipped" in out and "held-out captions" not in out
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "heldout_caption_ce" not in last


@pytest.mark.slow
def test_default_run_learns_to_read_its_images(tmp_path):
    """The whole default run (1000 steps, about a minute on 2 cores): on held-out samples the
    caption loss with each sample's own image must be clearly below the loss with another
    sample's image, so the model has learned to look, not only the caption grammar."""
    assert pretrain.main(["--no-progress", f"--train.run_dir={tmp_path}"]) == 0
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    right, wrong = final["heldout_caption_ce"], final["heldout_caption_ce_wrong_images"]
    assert right < 0.85 * wrong, (right, wrong)


def test_debug_toml_is_the_default():
    assert JobConfig.load(REPO / "configs" / "debug.toml") == JobConfig.load(None)


def test_overrides_and_their_errors(tmp_path):
    cfg = JobConfig.load(None, ["--optim.lr=1e-4", "--optim.betas=[0.8, 0.9]", "--model.preset=proxy-1b",
                                "--optim.warmup_steps=0"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.model.preset == "proxy-1b"
    assert JobConfig.load(None, ["--train.run_dir=2024"]).train.run_dir == "2024"  # text for str fields
    with pytest.raises(ValueError, match=r"data.seq_len \(600\) exceeds the debug model's max_positions \(512\)"):
        JobConfig.load(None, ["--data.seq_len=600"])
    with pytest.raises(ValueError, match="unknown key optim.learning_rate"):
        JobConfig.load(None, ["--optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown config section \[optimizer\]"):
        JobConfig.load(None, ["--optimizer.lr=1"])
    # in a file: a key before every section, and a folder given as the file
    (tmp_path / "top.toml").write_text("steps = 3\n")
    with pytest.raises(ValueError, match=r"key 'steps' outside every section; keys belong in one of"):
        JobConfig.load(tmp_path / "top.toml")
    with pytest.raises(FileNotFoundError, match=r"is a directory, not a TOML file"):
        JobConfig.load(tmp_path)
    with pytest.raises(ValueError, match="train.steps must be int, got str 'many'"):
        JobConfig.load(None, ["--train.steps=many"])
    with pytest.raises(ValueError, match="model.preset must be one of"):
        JobConfig.load(None, ["--model.preset=emu3"])
    with pytest.raises(ValueError, match=r"optim.warmup_steps \(20\) must be in \[0, train.steps = 10\)"):
        JobConfig.load(None, ["--train.steps=10"])
    with pytest.raises(ValueError, match="must look like --section.key=value"):
        JobConfig.load(None, ["--steps=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ValueError, match="is not valid TOML"):
        JobConfig.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JobConfig.load(tmp_path / "missing.toml")


def test_cli_reports_bad_config_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "emu2_engine.pretrain", "--train.steps=0"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pretrain: train.steps must be positive, got 0"
    # a bad kernel choice is refused before anything is built, in one line
    proc = subprocess.run([sys.executable, "-m", "emu2_engine.pretrain", "--train.steps=2"],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "EMU2_KERNELS": "auto,attn=reference"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pretrain: EMU2_KERNELS names op 'attn', which is not one of")


def test_lr_schedule_shape():
    cfg = OptimSection(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] > 0.1      # the floor comes one step after the last
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[10:], f[11:]))  # decays monotonically
    lin = OptimSection(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    g = [lr_factor(s, 100, lin) for s in range(100)]
    assert g[0] == 1.0 and g[50] == pytest.approx(0.5) and g[-1] == pytest.approx(0.01)  # never a step at 0


def test_parameter_groups_and_freezing():
    model = Emu2Model(Emu2Config.from_preset("debug"))
    opt = build_optimizer(model, OptimSection(lr=1e-3, lr_vision=2e-4, lr_projector=5e-4, weight_decay=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["vision"]["lr"] == 2e-4 and by_name["projector"]["lr"] == 5e-4
    assert by_name["llm"]["lr"] == 1e-3 and by_name["llm"]["weight_decay"] == 0.1
    assert by_name["llm_no_decay"]["weight_decay"] == 0.0
    ids = {id(p) for p in by_name["vision_no_decay"]["params"]}
    assert id(model.visual.pos_embed) in ids and id(model.visual.blocks["0"].attn.q_bias) in ids
    n_grouped = sum(len(g["params"]) for g in opt.param_groups)
    assert n_grouped == len(list(model.parameters()))
    # every parameter: its component by name, and decay exactly for the matrices (no norm, bias,
    # q/v bias, CLS or position embedding decays, in any component)
    group_of = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        comp = ("vision" if name.startswith("visual.") else
                "projector" if name.startswith(("projector.", "project_down.")) else "llm")
        decays = p.dim() >= 2 and not name.endswith(("cls_token", "pos_embed", "q_bias", "v_bias"))
        assert group_of[id(p)] == comp + ("" if decays else "_no_decay"), name
    assert group_of[id(model.project_down.weight)] == "projector"
    assert group_of[id(model.visual.blocks["0"].norm1.bias)] == "vision_no_decay"

    frozen = Emu2Model(Emu2Config.from_preset("debug"))
    opt = build_optimizer(frozen, OptimSection(lr_vision=0.0))
    assert not any(p.requires_grad for p in frozen.visual.parameters())
    assert all(not g["name"].startswith("vision") for g in opt.param_groups)


def test_world_size_must_match_the_degrees(monkeypatch):
    from emu2_engine.train.trainer import Trainer
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"1 x 1 x 1 x 1 = 1 must equal the world size 2"):
        Trainer(JobConfig.load(None))


@pytest.mark.gpu
def test_pretrain_on_gpu(tmp_path):
    assert pretrain.main(["--no-progress", "--train.steps=30", f"--train.run_dir={tmp_path}"]) == 0


def test_bf16_autocast_step_runs_the_fused_ops(tmp_path):
    """`train.dtype = bf16` (the default on a GPU) on the CPU: the fused head loss and
    pool_project are custom ops, which autocast does not cast; their wrappers must."""
    from emu2_engine.train.trainer import Trainer

    cfg = JobConfig.load(None, ["--train.steps=2", "--optim.warmup_steps=1", "--train.dtype=bf16",
                                f"--train.run_dir={tmp_path}"])
    trainer = Trainer(cfg)
    batch = next(trainer.loader)
    first = trainer.step([batch])
    second = trainer.step([batch])
    assert math.isfinite(first.loss) and math.isfinite(second.grad_norm)
    assert second.loss < first.loss  # the same batch again, after one step


PRETRAIN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.toml") if not p.name.startswith("decoder_"))


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_pretrain_config_loads_and_validates(path):
    """Each recipe in configs/ loads, passes every check at the world size its degrees span
    (including the model checks: tp divides the heads, pipeline stages fit the layers), and
    its batch is whole micro-batches of at least pp each."""
    cfg = JobConfig.load(path)
    dims = cfg.parallel.dims()
    cfg.validate(world_size=dims.world_size)
    assert cfg.parallel.microbatches >= dims.pp
    assert JobConfig.load(None, []).to_toml().count("[") == cfg.to_toml().count("[")  # every section


def test_the_37b_recipes_spell_out_their_layout():
    layouts = {p.stem: JobConfig.load(p).parallel for p in PRETRAIN_CONFIGS if "37b" in p.stem}
    assert set(layouts) == {"stage1_37b", "stage2_37b", "chat_37b", "gen_37b"}
    assert all(p.dims().world_size == 64 for p in layouts.values())
    stage1, stage2 = JobConfig.load(REPO / "configs/stage1_37b.toml"), JobConfig.load(REPO / "configs/stage2_37b.toml")
    assert stage1.data.regress == [] and min(stage1.optim.lr, stage1.optim.lr_vision, stage1.optim.lr_projector) > 0
    assert len({stage1.optim.lr, stage1.optim.lr_vision}) == 2  # separate peak LRs
    assert stage2.optim.lr_vision == 0.0 and stage2.data.regress
    assert stage2.data.weights == [9600.0, 3200.0, 6400.0, 3200.0, 800.0]  # 12800 : 6400 : 3200 : 800


def test_the_37b_recipes_take_the_papers_optimiser_settings():
    """Section 2.2.2 and Tables 6, 8 and 9 of arXiv:2312.13286v2 (the paper's supplement)."""
    cfg = {p.stem: JobConfig.load(p) for p in PRETRAIN_CONFIGS if "37b" in p.stem}
    s1, s2, chat, gen = (cfg[k].optim for k in ("stage1_37b", "stage2_37b", "chat_37b", "gen_37b"))
    assert (s1.lr_projector, s1.lr, s1.lr_vision) == (1e-4, 3e-5, 5e-5)
    assert (s2.lr_projector, s2.lr, s2.lr_vision) == (1e-5, 1e-5, 0.0)
    assert (chat.lr, chat.lr_projector, chat.lr_vision) == (1e-5, 0.0, 0.0)
    assert (gen.lr, gen.lr_projector, gen.lr_vision) == (5e-5, 5e-5, 0.0)
    assert [o.betas for o in (s1, s2, chat, gen)] == [(0.9, 0.95), (0.9, 0.95), (0.9, 0.98), (0.9, 0.95)]
    assert {o.eps for o in (s1, s2, chat, gen)} == {1e-6}
    assert [o.grad_clip for o in (s1, s2, chat, gen)] == [5.0, 5.0, 5.0, 1.0]
    assert [o.schedule for o in (s1, s2, chat, gen)] == ["cosine"] * 4
    assert (s1.warmup_steps, s2.warmup_steps, chat.warmup_steps, gen.warmup_steps) == (
        round(0.02 * 35200), round(0.1 * 20350), 100, 100)
    assert chat.min_lr_ratio == gen.min_lr_ratio == 0.0  # "decays to zero with a cosine schedule"
    assert cfg["chat_37b"].data.template == "chat" and cfg["chat_37b"].model.regression_weight == 0.0
    assert not cfg["gen_37b"].data.text_loss and cfg["gen_37b"].data.regress  # the image loss only
    chat_debug = JobConfig.load(REPO / "configs/chat_debug.toml")
    assert chat_debug.model.preset == "debug-chat" and chat_debug.data.template == "chat"


VIDEO_BLEND = ["--data.datasets=['video_text', 'text']", "--data.weights=[1.0, 1.0]", "--data.paths=['', '']"]


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.tp=3"], r"parallel.tp = 3 must divide vision.heads \(4\) of the model 'debug'"),
    (["--parallel.pp=2"], r"parallel.microbatches \(1\) must be at least pp \(2\) to fill the pipeline"),
    (["--parallel.pp=2", "--parallel.microbatches=2", "--parallel.pp_schedule=zbv",
      "--parallel.stages_per_rank=2"], r"4 pipeline stages \(pp x stages_per_rank\) need at least 3 LLM layers"),
    (["--parallel.tp=2", "--data.seq_len=127", "--data.text_len=127", "--data.interleaved_len=127"],
     r"sequence parallelism needs data.seq_len \(127\) to be a multiple of parallel.tp \(2\)"),
    (["--model.llm_layers=-1"], "model.llm_layers must be >= 0, got -1"),
    (["--train.global_batch=10", "--parallel.tp=2"],
     r"train.global_batch \(10\) must be dp \(1\) x parallel.microbatches \(1\) x data.rows \(4\) = 4: "
     r"10 rows do not split into micro-batches of 4 rows on 1 data-parallel ranks"),
    (["--train.global_batch=32", "--parallel.dp_shard=2"],
     r"= 8: set parallel.microbatches = 4"),
    (["--parallel.activation_checkpoint=some"], "parallel.activation_checkpoint must be one of"),
    (["--parallel.dp_replicate=2"], r"dp_replicate = 2 needs dp_shard > 1"),
    (["--parallel.microbatches=0"], r"parallel.microbatches must be >= 1, got 0"),
    (["--train.max_nonfinite=0"], "train.max_nonfinite must be positive, got 0"),
    (["--checkpoint.keep=0"], "checkpoint.keep must be positive, got 0"),
    (["--checkpoint.interval=-1"], "checkpoint.interval must be >= 0, got -1"),
    (["--metrics.log_interval=0"], "metrics.log_interval must be positive, got 0"),
    # the debug model has 16 visual tokens per image: an image span is 20 tokens, a video of
    # 4 frames 1 + 4 x 18 + 2 = 75; neither is ever cut, so a row that cannot hold it is refused
    (["--data.seq_len=19", "--data.text_len=19", "--data.interleaved_len=19"],
     r"data.seq_len \(19\) cannot hold one image of the debug model \(16 visual tokens\): needs >= 20"),
    # an interleaved dataset needs documents that hold an image; a blend without one never reads
    # interleaved_len (an image-caption-only run with short rows was refused for it)
    (["--data.datasets=['image_text', 'interleaved']", "--data.weights=[1, 1]", "--data.paths=['', '']",
      "--data.interleaved_len=19"],
     r"data.interleaved_len \(19\) cannot hold one image of the debug model \(16 visual tokens\): needs >= 20"),
    ([*VIDEO_BLEND, "--data.max_images=3"],
     r"data.video_frames \(4\) exceeds data.max_images \(3\): every video of the video_text"),
    ([*VIDEO_BLEND, "--data.seq_len=74", "--data.text_len=74", "--data.interleaved_len=74"],
     r"data.seq_len \(74\) cannot hold one video of 4 frames of the debug model \(16 visual "
     r"tokens each\): needs >= 75"),
    # debug-chat's frames take 4 tokens (Emu2-Chat's 64), its images 16 (256): a video of 4 frames
    # needs 1 + 4 x 6 + 2 = 27; the regression head predicts an image's 16, so frames are not
    # regression targets
    ([*VIDEO_BLEND, "--model.preset=debug-chat", "--data.seq_len=26", "--data.text_len=26",
      "--data.interleaved_len=26"],
     r"data.seq_len \(26\) cannot hold one video of 4 frames of the debug-chat model \(4 visual "
     r"tokens each\): needs >= 27"),
    ([*VIDEO_BLEND, "--model.preset=debug-chat", "--data.regress=['video_text']"],
     r"data.regress lists video_text for the debug-chat model, whose video frames take 4 visual "
     r"tokens and its images 16"),
])
def test_parallel_and_run_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        JobConfig.load(None, overrides)


def test_a_blend_without_documents_ignores_interleaved_len(tmp_path):
    from emu2_engine.train.trainer import Trainer

    cfg = JobConfig.load(None, ["--data.datasets=['image_text']", "--data.weights=[1]", "--data.paths=['']",
                                "--data.seq_len=24", "--data.interleaved_len=19", "--data.text_len=19",
                                "--train.steps=1", "--optim.warmup_steps=0", "--train.eval_batches=0",
                                f"--train.run_dir={tmp_path}"])
    batch = next(Trainer(cfg).loader)
    assert batch.input_ids.shape[1] == 24


@pytest.mark.parametrize("override, message", [
    ("--model.regression_weight=nan", r"model.regression_weight must be a finite number >= 0, got nan"),
    ("--model.regression_weight=-1", r"model.regression_weight must be a finite number >= 0, got -1.0"),
    ("--optim.betas=[1.5, 2]", r"optim.betas must each lie in \[0, 1\), got \[1.5, 2.0\]"),
    ("--optim.betas=[0.9, 1.0]", r"optim.betas must each lie in \[0, 1\), got \[0.9, 1.0\]"),
    ("--optim.betas=[-0.1, 0.9]", r"optim.betas must each lie in \[0, 1\)"),
    ("--optim.weight_decay=-1", r"optim.weight_decay must be a finite number >= 0, got -1.0"),
    ("--optim.eps=0", r"optim.eps must be a finite number > 0, got 0.0"),
    ("--optim.eps=nan", r"optim.eps must be a finite number > 0, got nan"),
    ("--optim.lr=inf", r"optim.lr, optim.lr_vision and optim.lr_projector must be finite numbers >= 0, "
                       r"got inf, 0.001 and 0.001"),
    ("--optim.lr_vision=nan", r"must be finite numbers >= 0, got 0.001, nan and 0.001"),
    ("--optim.lr_projector=-1e-4", r"must be finite numbers >= 0, got 0.001, 0.001 and -0.0001"),
    ("--data.weights=[inf, 1, 1]", r"data.weights must be finite, >= 0, not all 0 and of a finite sum, got "
                                   r"\[inf, 1.0, 1.0\]"),
    ("--data.weights=[1e308, 1e308, 1]", r"data.weights must be .* of a finite sum, got \[1e\+308, 1e\+308, 1.0\]"),
    ("--train.seed=-1", r"train.seed must lie in \[0, 2\*\*63\), got -1"),
    (f"--train.seed={2 ** 70}", r"train.seed must lie in \[0, 2\*\*63\), got 1180591620717411303424"),
    ("--data.seed=-1", r"data.seed must lie in \[0, 2\*\*63\), got -1"),
    ("--optim.grad_clip=inf", r"optim.grad_clip must be a finite number >= 0 \(0 turns clipping off\), got inf"),
    ("--data.rows=1000000000", r"a micro-batch of data.rows x data.seq_len tokens must stay under 2\*\*31 .*"
                               r"got 1000000000 x 256"),
    # 4 rows of 256 tokens hold at most 1024 // 18 = 56 of the debug model's images (16 tokens + 2)
    ("--data.max_images=1025", r"data.max_images \(1025\) exceeds the 1024 tokens of a micro-batch \(4 "
                               r"row\(s\) of 256\); each visual input of the debug model takes at least 18 "
                               r"of them, so at most 56 fit"),
    ("--train.run_dir=", r"train.run_dir must name a folder \(it gets the config, metrics and "
                         r"checkpoints\), got ''"),
])
def test_numbers_out_of_range_are_refused(override, message):
    """NaN and infinities pass comparisons like `x >= 0` the wrong way or not at all: each
    value is checked for its range and finiteness, with what came in the message."""
    with pytest.raises(ValueError, match=message):
        JobConfig.load(None, [override])


def test_the_edges_of_the_ranges_load():
    cfg = JobConfig.load(None, ["--model.regression_weight=0", "--optim.betas=[0, 0.999]",
                                "--optim.weight_decay=0", "--optim.lr_vision=0", "--optim.eps=1e-30",
                                "--data.max_images=1024", f"--train.seed={2 ** 63 - 1}"])
    assert cfg.optim.betas == (0.0, 0.999) and cfg.model.regression_weight == 0.0
    assert cfg.data.max_images == 1024 and cfg.train.seed == 2 ** 63 - 1


def test_video_and_image_spans_that_just_fit_load():
    """The limits are exact: 20 tokens hold one debug image, 75 one 4-frame video, and 4
    frames fit max_images = 4; a video dataset with weight 0 is not drawn, so not checked."""
    JobConfig.load(None, ["--data.seq_len=20", "--data.text_len=20", "--data.interleaved_len=20"])
    JobConfig.load(None, [*VIDEO_BLEND, "--data.max_images=4",
                          "--data.seq_len=75", "--data.text_len=75", "--data.interleaved_len=75"])
    JobConfig.load(None, ["--data.datasets=['video_text', 'text']", "--data.weights=[0.0, 1.0]",
                          "--data.paths=['', '']", "--data.max_images=3"])
    with pytest.raises(ValueError, match=r"data.video_frames \(4\) exceeds data.max_images \(3\)"):
        JobConfig.load(REPO / "configs/stage2_debug.toml", ["--data.max_images=3"])


def test_world_size_must_be_the_product_of_the_degrees():
    cfg = JobConfig.load(None, ["--parallel.tp=2", "--parallel.dp_shard=2"])
    cfg.validate(world_size=4)
    with pytest.raises(ValueError, match=r"1 x 2 x 2 x 1 = 4 must equal the world size 8"):
        cfg.validate(world_size=8)


TINY_RUN = ["--no-progress", "--data.seq_len=128", "--data.rows=2", "--data.max_images=8",
            "--data.text_len=128", "--data.interleaved_len=128", "--train.steps=2",
            "--optim.warmup_steps=1", "--train.eval_batches=0", "--metrics.tensorboard=false"]


def test_checkpoint_errors_inside_train_exit_2_with_one_line(tmp_path, capsys):
    """checkpoint.resume is only read once train() starts: a folder that is no checkpoint, or
    the checkpoint of another model, is bad input (exit 2, one line on stderr), not a crash
    that exits 1, which means non-finite losses."""
    import torch

    from emu2_engine.checkpoint.dcp import Checkpointer

    missing = tmp_path / "nowhere" / "step-000010"
    rc = pretrain.main([*TINY_RUN, f"--train.run_dir={tmp_path / 'a'}", f"--checkpoint.resume={missing}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"pretrain: {missing} is not a complete checkpoint (no "
                                            f".metadata: missing, or its save did not finish)")

    other = torch.nn.Linear(3, 2)  # a complete checkpoint, of something else
    folder = Checkpointer(tmp_path / "other", other, torch.optim.SGD(other.parameters(), lr=0.1)).save(1)
    rc = pretrain.main([*TINY_RUN, f"--train.run_dir={tmp_path / 'b'}", f"--checkpoint.resume={folder}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(f"pretrain: cannot load checkpoint {folder} into this model: ")


def test_a_corrupt_metrics_file_on_resume_exits_2_with_one_line(tmp_path, capsys):
    """A metrics file with a bad line before its last (not a torn write) stops the resumed run
    with the line's number (the torn last line case is tests/test_metrics_writer.py)."""
    run = tmp_path / "run"
    assert pretrain.main([*TINY_RUN, f"--train.run_dir={run}"]) == 0  # 2 steps, checkpoint at 2
    (run / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    rc = pretrain.main([*TINY_RUN, "--train.steps=3", f"--train.run_dir={run}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(f"pretrain: {run / 'metrics.jsonl'} line 1 is not a JSON record")


def test_init_from_excludes_a_resume_path(tmp_path):
    """checkpoint.init_from names weights to start a new run from; the config checks that no
    resume path contradicts it. Whether they exist is checked where they are read (a run
    resuming from its own checkpoint never reads them, so a restart must not fail on them)."""
    assert JobConfig.load(None).checkpoint.init_from == ""
    folder, weights = tmp_path / "step-000100", tmp_path / "emu2.safetensors"
    folder.mkdir()
    weights.write_bytes(b"")
    for path in (folder, weights):
        for resume in ("auto", "none"):
            cfg = JobConfig.load(None, [f"--checkpoint.init_from={path}", f"--checkpoint.resume={resume}"])
            assert cfg.checkpoint.init_from == str(path)
    saved = tmp_path / "config.toml"
    cfg.save(saved)
    assert JobConfig.load(saved) == cfg
    missing = tmp_path / "nowhere"
    assert JobConfig.load(None, [f"--checkpoint.init_from={missing}"]).checkpoint.init_from == str(missing)
    with pytest.raises(ValueError, match=r"checkpoint.init_from \(.*\) starts a new run from weights and "
                                         r"checkpoint.resume \('runs/a/step-000010'\) continues a saved one"):
        JobConfig.load(None, [f"--checkpoint.init_from={folder}", "--checkpoint.resume=runs/a/step-000010"])


def test_an_error_that_may_be_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Once training runs, the engine's input errors (here a CheckpointError) are one line; any
    other ValueError may be a bug, so its traceback comes before the line. Both exit 2."""
    from emu2_engine.checkpoint.dcp import CheckpointError
    from emu2_engine.train.trainer import Trainer

    for error, traced in ((CheckpointError("no complete checkpoint in x"), False), (ValueError("boom"), True)):
        def fail(self, progress=True, stop_at=None, error=error):
            raise error
        monkeypatch.setattr(Trainer, "train", fail)
        assert pretrain.main([*TINY_RUN, f"--train.run_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"pretrain: {error}"
        assert ("Traceback (most recent call last)" in err) == traced
