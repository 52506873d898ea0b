"""Generation over the KV cache (`emu2_engine.inference.generate`) against the full forward.

- prefill + incremental steps (single tokens, single visual rows, a chunk of three) give the
  full forward's logits at every position, with images (and a video frame) in the prompt;
- greedy text with the cache equals the uncached reference (a full `model.logits` per token)
  and transformers' `LlamaForCausalLM.generate(do_sample=False)` on the same weights;
- the regressed visual embeddings with the cache equal the reference's (a full forward per
  embedding), and the training path reproduces them: fed back as a real image's pooled
  features, the model's own regression loss on them is zero;
- bad arguments give one ValueError each.

Debug presets at fp32 with seeded random weights large enough that greedy choices are not
near-ties (norm gains 1 + 0.1 N(0, 1), every other weight N(0, 0.05^2)).
"""

from __future__ import annotations

import pytest
import torch

from emu2_engine.data.packing import collate_packed
from emu2_engine.data.records import IMAGE_MARKER
from emu2_engine.data.sequences import SampleBuilder
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.inference.generate import (
    KVCache,
    benchmark,
    extend,
    generate_image_embeddings,
    generate_image_embeddings_uncached,
    generate_text,
    generate_text_uncached,
    prefill,
)
from emu2_engine.models import Emu2Config, Emu2Model

ATOL = 1e-5  # fp32: the cached path and the full forward differ by rounding only


def _model(preset: str, seed: int = 0) -> Emu2Model:
    torch.manual_seed(seed)
    model = Emu2Model(Emu2Config.from_preset(preset)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def debug() -> Emu2Model:
    return _model("debug")


@pytest.fixture(scope="module")
def chat() -> Emu2Model:
    return _model("debug-chat", seed=1)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompt(model: Emu2Model, video_frame: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(1, S) ids of odd length with two images (the second one a video frame when
    `video_frame`) among text, their pixels, and the position just after the first image."""
    s, n = model.cfg.special_ids, model.cfg.n_query
    first = [s.bos, 40, 41, s.img] + [s.image] * n + [s.img_end]
    if video_frame:
        second = [s.video, s.img] + [s.gen_img] * model.cfg.frame_queries + [s.img_end]
    else:
        second = [s.img] + [s.image] * n + [s.img_end]
    ids = first + list(range(50, 57)) + second + [77, 78, 79]
    if len(ids) % 2 == 0:
        ids.append(80)
    return torch.tensor([ids]), _images(2, model.cfg.vision.image_size), len(first)


# -- the cached forward ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["debug", "debug-chat"])
def test_cached_logits_match_full_forward_at_every_step(debug, chat, preset):
    model = debug if preset == "debug" else chat
    ids, images, after_first = _prompt(model, video_frame=preset == "debug-chat")
    S = ids.shape[1]
    assert S % 2 == 1
    with torch.no_grad():
        want = model.logits(ids, images)
        rows = model.prompt_embeddings(ids, images)  # the input rows, visual ones included
    # The prefix holds the first image; then a chunk of three, then one position at a time:
    # token ids at text positions, input rows at the second image's slots.
    P = after_first + 2
    hidden, cache = prefill(model, ids[:, :P], images[:1], max_new=S - P)
    got = [model.lm_head(hidden)]
    slots = set(model.cfg.special_ids.visual_slots)
    t = P
    while t < S:
        n = 3 if t == P else 1
        if n == 1 and int(ids[0, t]) not in slots:
            hidden = extend(model, cache, input_ids=ids[:, t:t + 1])
        else:
            hidden = extend(model, cache, embeds=rows[:, t:t + n])
        got.append(model.lm_head(hidden))
        t += n
    assert cache.length == S
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=ATOL, rtol=0)


def test_cache_refuses_positions_past_its_capacity(debug):
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    _, cache = prefill(debug, ids, max_new=1)
    extend(debug, cache, input_ids=ids[:, :1])
    with pytest.raises(ValueError, match="holds 6 positions; 7 are needed"):
        extend(debug, cache, input_ids=ids[:, :1])
    with pytest.raises(ValueError, match="at least one position"):
        KVCache(0)


# -- text -----------------------------------------------------------------------------------
def _chat_prompt(model: Emu2Model) -> tuple[torch.Tensor, torch.Tensor]:
    """Emu2-Chat's generation prompt (ends with `[ASSISTANT]:`) with one image, by the engine's
    own template."""
    builder = SampleBuilder(Emu2Tokenizer(chat=True), model.cfg.n_query,
                            frame_n_query=model.cfg.frame_n_query, template="chat")
    image = _images(1, model.cfg.vision.image_size, seed=3)[0]
    sample = builder.build_chat("chat", [(f"{IMAGE_MARKER}How many shapes are there?", None)], [image])
    return torch.from_numpy(sample.input_ids), torch.stack(sample.images)


def test_generate_text_cached_equals_uncached(chat):
    ids, images = _chat_prompt(chat)
    got = generate_text(chat, ids, images, max_new_tokens=12)
    want = generate_text_uncached(chat, ids, images, max_new_tokens=12)
    assert got.dtype == torch.int64 and got.dim() == 1
    assert got.tolist() == want.tolist()
    visual = set(chat.cfg.special_ids.visual_slots)
    assert not visual & set(got.tolist())


def test_generate_text_stops_at_eos_and_respects_max_new_tokens(debug):
    ids, images, _ = _prompt(debug)
    never = debug.cfg.special_ids.image  # a valid id that generation never picks
    run = generate_text(debug, ids, images, max_new_tokens=10, eos_id=never).tolist()
    assert len(run) == 10
    assert generate_text(debug, ids, images, max_new_tokens=1, eos_id=never).tolist() == run[:1]
    eos = run[5]
    stop = run.index(eos)
    for gen in (generate_text, generate_text_uncached):
        assert gen(debug, ids, images, max_new_tokens=10, eos_id=eos).tolist() == run[:stop + 1]


def test_text_only_greedy_matches_transformers(debug):
    transformers = pytest.importorskip("transformers")
    cfg = debug.cfg.llm
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {"model." + k: v for k, v in debug.llm.state_dict().items()}
    state["lm_head.weight"] = debug.lm_head.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    ids = torch.randint(3, debug.cfg.base_vocab_size, (1, 11), generator=torch.Generator().manual_seed(5))
    ids[0, 0] = 1
    n = 16
    ours = generate_text(debug, ids, max_new_tokens=n)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, eos_token_id=2, pad_token_id=0,
                             suppress_tokens=list(debug.cfg.special_ids.visual_slots))
    assert ours.tolist() == theirs[0, ids.shape[1]:].tolist()


# -- visual embeddings ----------------------------------------------------------------------
def test_image_embeddings_cached_equal_uncached(debug):
    """Editing-style prompt: an image, an instruction, `[IMG]` (odd length)."""
    s = debug.cfg.special_ids
    ids = [s.bos, s.img] + [s.image] * debug.cfg.n_query + [s.img_end, 60, 61, 62, 63, 64, s.img]
    assert len(ids) % 2 == 1
    images = _images(1, debug.cfg.vision.image_size, seed=7)
    got = generate_image_embeddings(debug, torch.tensor(ids), images)
    want = generate_image_embeddings_uncached(debug, torch.tensor(ids), images)
    assert got.shape == (debug.cfg.n_query, debug.cfg.vision.width)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_training_path_reproduces_the_generated_embeddings(debug, monkeypatch):
    """A caption, then its image as a regression target, laid out and collated by the data
    pipeline: with the generated embeddings as the image's pooled features (its slots get
    `project_up` of them, its targets are them), the model's regression loss is zero, so the
    prediction at `[IMG]` and at each of the first n_query - 1 slots is the embedding that
    generation made there."""
    cfg = debug.cfg
    builder = SampleBuilder(Emu2Tokenizer(), cfg.n_query)
    image = _images(1, cfg.vision.image_size, seed=9)[0]
    sample = builder.build_image_text(image, "a red circle above a blue square", image_first=False,
                                      regress=True)
    assert sample.regress == [True]
    prompt = torch.from_numpy(sample.input_ids[:sample.image_starts[0] + 1])  # ... [IMG]
    generated = generate_image_embeddings(debug, prompt)

    batch = collate_packed([sample], [[0]], len(sample), cfg.special_ids, cfg.n_query,
                           cfg.vision.image_size)
    batch.validate(cfg.llm.vocab_size, cfg.n_query, cfg.vision.image_size)
    monkeypatch.setattr(debug, "visual_rows", lambda features, input_ids, slots: (
        debug.projector(generated)[None], generated[None]))
    with torch.no_grad():
        loss = debug(batch)
    assert int(loss.n_reg) == cfg.n_query
    assert float(loss.mse) < 1e-10, float(loss.mse)
    assert float(generated.square().mean()) > 0.1  # not zero by accident


# -- bad input ------------------------------------------------------------------------------
def _text_ids() -> torch.Tensor:
    return torch.tensor([1, 40, 41, 42])


@pytest.mark.parametrize("call, match", [
    (lambda m: generate_image_embeddings(m, _text_ids()), r"must end with \[IMG\]"),
    (lambda m: generate_image_embeddings_uncached(m, _text_ids()), r"must end with \[IMG\]"),
    (lambda m: generate_text(m, _text_ids().float()), "integer token ids"),
    (lambda m: generate_text(m, [1, 40, 41]), "tensor of token ids"),
    (lambda m: generate_text(m, _text_ids().expand(2, 4)), r"one prompt, \(S,\) or \(1, S\)"),
    (lambda m: generate_text(m, _text_ids()[None, None]), r"one prompt, \(S,\) or \(1, S\)"),
    (lambda m: generate_text(m, _text_ids()[:0]), r"one prompt, \(S,\) or \(1, S\)"),
    (lambda m: generate_text(m, _text_ids(), max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (lambda m: generate_text_uncached(m, _text_ids(), max_new_tokens=-3), "max_new_tokens must be"),
    (lambda m: generate_text(m, torch.tensor([1, 40, 784])), r"must lie in \[0, 784\)"),
    (lambda m: generate_text(m, torch.tensor([1, -1, 40])), r"must lie in \[0, 784\)"),
    (lambda m: generate_text(m, _text_ids(), eos_id=784), r"eos_id must be a token id in \[0, 784\)"),
    (lambda m: generate_text(m, torch.tensor([1, 40, 515]), _images(2, 64)), "image placeholders"),
    # the debug model has 512 positions
    (lambda m: generate_text(m, _text_ids(), max_new_tokens=510),
     r"a prompt of 4 positions and 509 positions for max_new_tokens new tokens exceed the model's "
     r"max_positions \(512\)"),
    (lambda m: generate_image_embeddings(m, torch.tensor([1] + [40] * 498 + [m.cfg.special_ids.img])),
     r"a prompt of 500 positions and 15 visual embedding slots exceed the model's max_positions \(512\)"),
])
def test_bad_input_raises_one_clear_value_error(debug, call, match):
    with pytest.raises(ValueError, match=match):
        call(debug)


def test_benchmark_runs_and_prints(capsys):
    seconds = benchmark("debug", prompt_len=9, new_tokens=3, repeats=1)
    assert set(seconds) == {"text, cached", "text, uncached", "image embeddings, cached",
                            "image embeddings, uncached"}
    assert "ms" in capsys.readouterr().out


def test_greedy_never_picks_a_visual_placeholder():
    """Even when `<image>` and `[gIMG]` have the highest logits, greedy decoding takes the best
    other token (their rows are never a model's own input), cached and uncached alike."""
    model = _model("debug")
    special = model.cfg.special_ids
    ids = _text_ids()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0][0, -1].detach()))
    model.logits(ids[None])
    hook.remove()
    with torch.no_grad():  # rows along the last hidden state: their logits dominate there
        for slot in special.visual_slots:
            model.lm_head.weight[slot] = seen[0] * (1e3 / seen[0].square().sum())
    logits = model.logits(ids[None])[0, -1]
    assert int(logits.argmax()) in special.visual_slots
    for run in (generate_text, generate_text_uncached):
        out = run(model, ids, max_new_tokens=3, eos_id=special.eos)
        assert not set(out.tolist()) & set(special.visual_slots)
    banned = logits.clone()
    banned[list(special.visual_slots)] = float("-inf")
    assert int(generate_text(model, ids, max_new_tokens=1)[0]) == int(banned.argmax())
