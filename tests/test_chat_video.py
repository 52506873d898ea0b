"""Video for a chat model: Emu2-Chat gives a video frame 64 visual tokens and an image 256
(EMU2_FACTS.md); the debug-chat preset stands in with 4 and 16. Frames are laid out with their
own count, collated into rows of the image count with -1 after a frame's slots, embedded as the
frame's patches pooled to its count, and the packed training loss equals the loss the unpacked
documents give."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from emu2_engine.data.packing import collate_packed
from emu2_engine.data.sequences import SampleBuilder, truncate_sample
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.ops import pool_project
from emu2_engine.parallel.pipeline import Emu2Stage, stage_inputs

CFG = Emu2Config.from_preset("debug-chat")
NQ, FQ, SIZE = CFG.n_query, CFG.frame_queries, CFG.vision.image_size


@pytest.fixture(scope="module")
def tok():
    return Emu2Tokenizer()


@pytest.fixture(scope="module")
def builder(tok):
    return SampleBuilder(tok, NQ, seed=0, frame_n_query=FQ, bidirectional=True)


def _frames(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_the_presets_counts():
    assert (NQ, FQ) == (16, 4)
    chat = Emu2Config.from_preset("emu2-chat-37b")
    assert (chat.n_query, chat.frame_queries) == (256, 64)
    base = Emu2Config.from_preset("emu2-37b")
    assert (base.n_query, base.frame_queries) == (64, 64)
    for bad in (3, 9, 64, -4):  # not a square, or its side does not divide 4 (n_query 16's side)
        with pytest.raises(ValueError, match=rf"frame_n_query \({bad}\) must be 0 \(n_query\) or a square"):
            replace(CFG, frame_n_query=bad).validate()
    with pytest.raises(ValueError, match=r"frame_n_query must lie in \[0 \(n_query\), n_query = 16\], got 25"):
        SampleBuilder(Emu2Tokenizer(), NQ, frame_n_query=25)


def test_frames_take_their_own_count(tok, builder):
    ids = tok.ids
    video = builder.build_video_text(_frames(3, 0), "a ball moves.", video_first=False)
    frame = [ids.img] + [ids.gen_img] * FQ + [ids.img_end]
    assert video.input_ids.tolist()[-(1 + 3 * len(frame) + 1):] == [ids.video] + frame * 3 + [ids.eos]
    assert video.n_slots == [FQ] * 3
    starts = video.image_starts
    assert [starts[1] - starts[0], starts[2] - starts[1]] == [FQ + 2, FQ + 2]
    image = builder.build_image_text(_frames(1, 1)[0], "a red circle.", image_first=True)
    assert image.n_slots == [NQ] and image.input_ids.tolist()[1:NQ + 3] == (
        [ids.img] + [ids.image] * NQ + [ids.img_end])
    # Truncation measures each input by its own span: without the video's keep-whole range a
    # cut may fall between frames and keeps the frames that end before it.
    loose = replace(video, keep_whole=[])
    cut = truncate_sample(loose, starts[2] + 2, ids.eos, NQ)
    assert cut.image_starts == starts[:2] and cut.n_slots == [FQ, FQ] and len(cut.images) == 2
    # With it, the video is never cut: the cut falls before [VIDEO].
    whole = truncate_sample(video, starts[2] + 2, ids.eos, NQ)
    assert whole.images == [] and whole.n_slots == []


def _batch(tok, builder, max_images=6):
    """One row: an image document (16 slots) then a video of two frames (4 slots each), and a
    second row with a video before its caption; padded to max_images."""
    image = builder.build_image_text(_frames(1, 1)[0], "a red circle.", image_first=False)
    video = builder.build_video_text(_frames(2, 2), "a ball moves.", video_first=False)
    video2 = builder.build_video_text(_frames(1, 3), "a blue square.", video_first=True)
    samples = [image, video, video2]
    seq = len(image) + len(video)
    batch = collate_packed(samples, [[0, 1], [2]], seq, tok.ids, NQ, SIZE, max_images=max_images)
    return batch, samples


def test_collation_pads_each_frames_slots(tok, builder):
    batch, (image, video, video2) = _batch(tok, builder)
    slots = batch.image_slots
    assert slots.shape == (6, NQ)
    assert (slots[0] >= 0).all()
    for k in (1, 2, 3):  # frames: their 4 [gIMG] positions, then -1
        assert (slots[k, :FQ] >= 0).all() and (slots[k, FQ:] == -1).all()
        assert (batch.input_ids.reshape(-1)[slots[k, :FQ]] == tok.ids.gen_img).all()
    assert (slots[4:] == -1).all() and batch.image_mask.tolist() == [True] * 4 + [False] * 2
    # bidirectional spans cover each input's own slots
    for k in range(4):
        n = NQ if k == 0 else FQ
        assert int((batch.span_ids.reshape(-1) == k).sum()) == n
    batch.validate(CFG.llm.vocab_size, NQ, SIZE, frame_n_query=FQ, frame_slot=tok.ids.gen_img)
    # Without the frames' count a frame's row is wrong; so is a frame row with a slot too many,
    # and a regressed frame.
    with pytest.raises(ValueError, match=r"image_slots row 1 \(an image\) must hold 16 positions, "
                                         r"then -1 to the end of the row; got 4"):
        batch.validate(CFG.llm.vocab_size, NQ, SIZE)
    with pytest.raises(ValueError, match=r"needs frame_slot \(the \[gIMG\] id\) to tell the video frames"):
        batch.validate(CFG.llm.vocab_size, NQ, SIZE, frame_n_query=FQ)
    bad = batch.image_slots.clone()
    bad[2, FQ] = 0
    with pytest.raises(ValueError, match=r"row 2 \(a video frame\) must hold 4 positions"):
        replace(batch, image_slots=bad).validate(CFG.llm.vocab_size, NQ, SIZE, frame_n_query=FQ,
                                                 frame_slot=tok.ids.gen_img)
    with pytest.raises(ValueError, match=r"reg_images names a video frame of 4 embeddings"):
        replace(batch, reg_images=torch.tensor([1]), reg_positions=torch.zeros(1, NQ, dtype=torch.long)
                ).validate(CFG.llm.vocab_size, NQ, SIZE, frame_n_query=FQ, frame_slot=tok.ids.gen_img)
    # A regressed frame is refused when collated, too.
    regressed = builder.build_video_text(_frames(1, 4), "x", video_first=False, regress=True)
    assert regressed.regress == [True]
    with pytest.raises(ValueError, match=r"regressed but has 4 slots"):
        collate_packed([regressed], [[0]], len(regressed), tok.ids, NQ, SIZE)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Emu2Model(CFG).eval()


def test_frame_rows_are_the_frames_patches_pooled_to_their_count(tok, model):
    """logits() on ids with an image and two frames equals the decoder run on embeddings made
    by hand: the image pooled to 16, each frame pooled to 4; and a video-only prompt equals a
    model of the same weights whose every input takes 4."""
    ids = tok.ids
    text = tok.encode("a ball moves.", special=False)
    frame = [ids.img] + [ids.gen_img] * FQ + [ids.img_end]
    seq = ([ids.bos, ids.img] + [ids.image] * NQ + [ids.img_end] + text + [ids.video] + frame * 2
           + text + [ids.eos])
    input_ids = torch.tensor(seq)[None]
    pixels = _frames(3, 5)
    with torch.no_grad():
        got = model.logits(input_ids, pixels)
        feats = model.visual(pixels)
        w = model.projector.project_up.weight
        h = model.llm.embed_tokens(input_ids)[0].clone()
        at = [k for k, t in enumerate(seq) if t in (ids.image, ids.gen_img)]
        h[at[:NQ]] = pool_project(feats[:1], w, NQ)[0]
        h[at[NQ:NQ + FQ]] = pool_project(feats[1:2], w, FQ)[0]
        h[at[NQ + FQ:]] = pool_project(feats[2:3], w, FQ)[0]
        S = len(seq)
        doc = torch.zeros(1, S, dtype=torch.int32)
        pos = torch.arange(S, dtype=torch.int32)[None]
        want = model.lm_head(model.llm(h[None], pos, doc, torch.full_like(doc, -1)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    small = Emu2Model(replace(CFG, n_query=FQ, frame_n_query=0)).eval()
    small.load_state_dict(model.state_dict())
    video_only = torch.tensor([ids.bos, ids.video] + frame * 2 + text + [ids.eos])[None]
    with torch.no_grad():
        torch.testing.assert_close(model.logits(video_only, pixels[1:]), small.logits(video_only, pixels[1:]),
                                   rtol=1e-5, atol=1e-5)
    # Placeholders that do not make whole inputs are refused with both counts named.
    with pytest.raises(ValueError, match=r"16 image placeholders \(<image>, 16 per image\) and 8 "
                                         r"video-frame placeholders \(\[gIMG\], 4 per frame\), which do "
                                         r"not make the 2 visual input\(s\) given"):
        model.logits(input_ids, pixels[:2])
    # the counts add up (16 <image>, 4 [gIMG]) but the first input is 2 [gIMG] then 2 <image>
    mixed = [ids.img] + [ids.gen_img] * 2 + [ids.image] * 2 + [ids.img_end]
    rest = [ids.img] + [ids.image] * (NQ - 2) + [ids.gen_img] * 2 + [ids.img_end]
    with pytest.raises(ValueError, match=r"visual input 0 of input_ids mixes <image> and \[gIMG\]"):
        model.logits(torch.tensor([ids.bos] + mixed + rest + [ids.eos])[None], pixels[:2])


def test_packed_loss_equals_the_unpacked_documents(tok, builder, model):
    batch, samples = _batch(tok, builder)
    batch.validate(CFG.llm.vocab_size, NQ, SIZE, frame_n_query=FQ, frame_slot=tok.ids.gen_img)
    images = iter(batch.images[batch.image_mask])
    terms = []
    with torch.no_grad():
        out = model(batch)
        for sample in samples:
            pixels = torch.stack([next(images) for _ in sample.images])
            # the unpacked document, as one sequence: its images (bidirectional spans differ)
            ids = torch.from_numpy(sample.input_ids)[None]
            logits = model.logits(ids, pixels)[0]
            for t in range(len(sample) - 1):
                if sample.text_target[t + 1]:
                    terms.append(-F.log_softmax(logits[t].double(), -1)[int(sample.input_ids[t + 1])])
    assert int(out.n_text) == len(terms)
    # bidirectional spans change the packed logits a little: compare with the spans removed
    causal = replace(batch, span_ids=torch.full_like(batch.span_ids, -1))
    with torch.no_grad():
        out = model(causal)
    torch.testing.assert_close(out.ce.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


def test_padding_gets_no_gradient_and_the_stage_agrees(tok, builder):
    """The model's backward through a batch with frames and padding images: finite, and the
    pipeline stage (fixed shapes: padding kept) computes the same losses and gradients."""
    batch, _ = _batch(tok, builder)
    torch.manual_seed(0)
    model = Emu2Model(CFG)
    pixels = batch.images.clone().requires_grad_(True)
    out = model(replace(batch, images=pixels))
    out.total.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert pixels.grad[4:].abs().sum() == 0 and pixels.grad[1:4].abs().sum() > 0

    torch.manual_seed(0)
    stage = Emu2Stage(Emu2Model(CFG))
    losses = stage(**stage_inputs(batch))
    losses[0].backward()
    torch.testing.assert_close(losses[0].detach(), out.total.detach(), rtol=1e-6, atol=1e-6)
    got = {n.removeprefix("model."): p.grad for n, p in stage.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_chat_trainer_runs_on_images_and_video(tmp_path):
    """`pretrain` on debug-chat with an image and a video dataset of the shapes world: the
    batches hold frames of 4 slots beside images of 16, pass the trainer's checks, and the
    steps run with finite losses."""
    from emu2_engine.train.config import JobConfig
    from emu2_engine.train.trainer import Trainer

    cfg = JobConfig.load(None, [
        "--model.preset=debug-chat", "--data.datasets=['image_text', 'video_text']",
        "--data.weights=[1.0, 1.0]", "--data.paths=['', '']", "--data.seq_len=128", "--data.rows=2",
        "--data.max_images=12", "--data.text_len=128", "--data.interleaved_len=128", "--data.prefetch=0", "--train.steps=2",
        "--optim.warmup_steps=1", "--train.eval_batches=0", "--metrics.log_interval=1",
        "--metrics.tensorboard=false", "--checkpoint.interval=0", f"--train.run_dir={tmp_path}"])
    trainer = Trainer(cfg)
    batch = next(iter(trainer.loader))
    real = batch.image_slots[batch.image_mask]
    counts = (real >= 0).sum(1)
    assert set(counts.tolist()) == {FQ, NQ}, counts
    trainer.batch_flops(batch)  # the trainer's validation
    records = trainer.train(progress=False)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)


def test_a_loader_state_resumes_across_frame_counts(tmp_path, caplog):
    """A chat loader's state (frames of 4 slots) loaded into a loader whose frames take an
    image's 16: the waiting videos are laid out again with a warning naming frame_n_query (it
    raised a KeyError), and the other way round too."""
    from emu2_engine.data.loader import build_loader
    from emu2_engine.train.config import JobConfig

    data = replace(JobConfig.load(None).data, cache_dir=str(tmp_path), datasets=["image_text", "video_text"],
                   weights=[1.0, 1.0], paths=["", ""], regress=[])
    tok = Emu2Tokenizer(chat=True)
    same = replace(CFG, frame_n_query=0)
    for saved_cfg, loaded_cfg, change in ((CFG, same, "frame_n_query 4 -> None"),
                                          (same, CFG, "frame_n_query None -> 4")):
        saved = build_loader(data, tok, saved_cfg)
        next(saved)
        loaded = build_loader(data, tok, loaded_cfg)
        caplog.clear()
        with caplog.at_level("WARNING", logger="emu2_engine.data.loader"):
            loaded.load_state_dict(saved.state_dict())
        assert f"data settings changed since the checkpoint ({change})" in caplog.text
        batch = next(loaded)
        batch.validate(loaded_cfg.llm.vocab_size, NQ, SIZE, frame_n_query=loaded_cfg.frame_queries,
                       frame_slot=tok.ids.gen_img)


def test_flops_credit_a_frames_own_rows(tok, builder):
    """batch_flops credits the encoder once per real input and `project_up` with the rows the
    inputs need: 16 for the image, 4 for each of the 3 frames (not 16 each, which the model
    computes and averages down)."""
    from emu2_engine.models.flops import batch_flops, projector_flops_per_image, vit_flops_per_image

    batch, _ = _batch(tok, builder)
    f = batch_flops(CFG, batch)
    assert f["vit"] == 4 * vit_flops_per_image(CFG.vision)
    assert f["projector"] == projector_flops_per_image(CFG, NQ + 3 * FQ)
