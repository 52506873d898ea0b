"""`python -m emu2_engine.evaluate`: VQAv2 accuracy by hand, the prompts a model answers after,
weights loading, and the command on a small saved model and the shapes world."""

import re
from collections import Counter

import pytest
import torch

from emu2_engine import evaluate
from emu2_engine.checkpoint.dcp import save_model_weights, step_folder
from emu2_engine.data.decode import Decoder
from emu2_engine.data.records import VQA
from emu2_engine.data.sequences import SampleBuilder
from emu2_engine.data.shards import ShardStream
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.evaluate import evaluate_vqa, load_model, normalize_answer, vqa_accuracy
from emu2_engine.models import Emu2Config, Emu2Model


@pytest.mark.parametrize("answer, humans, want", [
    ("red", ["red"] * 4 + ["blue"] * 6, 1.0),       # 4 agree: every leave-one-out subset has 3
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),       # (3 x 2/3 + 7 x 1) / 10
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),       # (2 x 1/3 + 8 x 2/3) / 10
    ("red", ["red"] + ["blue"] * 9, 0.3),           # (1 x 0 + 9 x 1/3) / 10
    ("green", ["red"] * 10, 0.0),
    ("Two.", ["2", "two", "2 ", "3"] + ["4"] * 6, 0.9),  # normalised, three say "2" (as above)
])
def test_vqa_accuracy_by_hand(answer, humans, want):
    assert vqa_accuracy(answer, humans) == pytest.approx(want)


@pytest.mark.parametrize("text, want", [
    ("Two.", "2"), ("the Red circle!", "red circle"), ("on the left.", "on left"), ("2.5", "2.5"),
    ("  an   orange\ttriangle ", "orange triangle"), ("ten", "10"), ("yes, it is", "yes it is"),
    # as the official VQA evaluation: joining marks become spaces, "none" is 0, : % stay
    ("t-shirt", "t shirt"), ("black-and-white", "black and white"), ("yes/no", "yes no"),
    ("hot_dog", "hot dog"), ("none", "0"), ("3:30", "3:30"), ("10%", "10%"), ("1,000 people", "1000 people"),
    ("left - right", "left right"), (".5 litres", ".5 litres"),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_vqa_accuracy_needs_human_answers():
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("red", [])


@pytest.fixture(scope="module")
def heldout():
    """Six held-out VQA records of the shapes world (the debug model's 64 px; the world the
    other tests share, under the default cache folder)."""
    root = evaluate.shapes_world_shards("~/.cache/emu2_engine", seed=1234)
    stream = ShardStream(root, Decoder("vqa", 64, backend="pil", log=None), shuffle=False, log=None, epochs=1)
    return [next(stream) for _ in range(6)]


@pytest.mark.parametrize("prompt", ["chat", "zero-shot"])
def test_the_score_of_an_oracle_a_constant_and_the_prompts_asked(heldout, prompt):
    """An answerer that gives each question's most common human answer scores 1; one that always
    says "purple elephant" scores 0; the prompts are the chat template's academic question
    (ending [ASSISTANT]:) or the paper's zero-shot prompt, with the image and without the answer."""
    tok = Emu2Tokenizer(chat=True)
    builder = SampleBuilder(tok, 16)
    records, asked = iter(heldout), []

    def oracle(sample):  # records are asked in order
        record = next(records)
        asked.append((record, sample))
        return Counter(record.answers).most_common(1)[0][0]

    got = evaluate_vqa(heldout, builder, oracle, prompt)
    assert got == {"questions": len(heldout), "accuracy": 1.0, "exact": 1.0}
    for record, sample in asked:
        text = tok.decode(sample.input_ids.tolist())
        assert record.question in text and len(sample.images) == 1 and sample.input_ids[-1] != tok.ids.eos
        assert torch.equal(sample.images[0], record.image)
        assert text.endswith("[ASSISTANT]:" if prompt == "chat" else "short answer:")
    assert evaluate_vqa(heldout, builder, lambda s: "purple elephant", prompt, limit=4)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="no VQA record"):
        evaluate_vqa([], builder, oracle, prompt)


def test_load_model_reads_checkpoints_and_run_folders(tmp_path):
    torch.manual_seed(0)
    model = Emu2Model(Emu2Config.from_preset("debug"))
    model.init_weights()
    save_model_weights(model, step_folder(tmp_path / "run" / "checkpoints", 7), step=7)
    for weights in (tmp_path / "run", step_folder(tmp_path / "run" / "checkpoints", 7)):
        loaded = load_model("debug", weights)
        assert not loaded.training
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("debug", tmp_path / "nowhere")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no complete checkpoint"):
        load_model("debug", tmp_path / "empty")


def test_the_command(tmp_path, capsys, monkeypatch):
    """On a saved random debug model and 3 held-out questions: one line with the accuracy; a
    missing weights path and a chat prompt for a model without the chat tokens are one-line
    errors."""
    torch.manual_seed(0)
    model = Emu2Model(Emu2Config.from_preset("debug"))
    model.init_weights()
    save_model_weights(model, tmp_path / "ckpt", step=1)
    cache = []  # the default cache folder: the world the other tests share
    evaluate.main(["--preset", "debug", "--weights", str(tmp_path / "ckpt"), "--limit", "3",
                   "--max-new-tokens", "2", *cache])
    out = capsys.readouterr().out
    assert "VQA (zero-shot prompt, greedy, 3 questions): accuracy" in out
    evaluate.main(["--preset", "debug", "--weights", str(tmp_path / "ckpt"), "--limit", "2", "--prompt", "few-shot",
                   "--shots", "2", "--support", "5", "--max-new-tokens", "2", *cache])
    assert "VQA (2-shot RICES prompt, greedy, 2 questions): accuracy" in capsys.readouterr().out
    evaluate.main(["--task", "edit", "--preset", "debug", "--weights", str(tmp_path / "ckpt"), "--limit", "2", *cache])
    assert "edits (2): mean squared distance to the edited image's features: generated" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # options of the VQA task are refused, not ignored
        evaluate.main(["--task", "edit", "--preset", "debug", "--weights", str(tmp_path / "ckpt"), "--show"])
    assert exit_info.value.code == 2 and "are for --task vqa" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--preset", "debug", "--weights", str(tmp_path / "nowhere"), *cache])
    assert exit_info.value.code == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--preset", "debug", "--weights", str(tmp_path / "ckpt"), "--prompt", "chat", *cache])
    assert exit_info.value.code == 2
    assert "needs a preset with the chat vocabulary" in capsys.readouterr().err


def test_the_chat_command(tmp_path, capsys, monkeypatch):
    """`python -m emu2_engine.chat`: the question in Emu2-Chat's template with the image's
    pixels, the greedy answer printed; bad input is a one-line error."""
    from PIL import Image

    from emu2_engine import chat
    from emu2_engine.data.sequences import SYSTEM_MESSAGES, to_pixels
    from emu2_engine.inference import generate

    torch.manual_seed(0)
    model = Emu2Model(Emu2Config.from_preset("debug-chat"))
    model.init_weights()
    save_model_weights(model, tmp_path / "ckpt", step=1)
    picture = Image.new("RGB", (40, 30), (200, 30, 30))
    picture.save(tmp_path / "red.png")
    tok = Emu2Tokenizer(chat=True)
    seen = {}

    def fake(model, ids, images, max_new_tokens, eos_id):
        seen.update(ids=ids, images=images, max_new_tokens=max_new_tokens, eos=eos_id)
        return torch.tensor(tok.encode("a red picture.", special=False) + [tok.ids.eos])

    monkeypatch.setattr(generate, "generate_text", fake)
    chat.main(["--preset", "debug-chat", "--weights", str(tmp_path / "ckpt"), "--image", str(tmp_path / "red.png"),
               "--system", "academic", "--max-new-tokens", "5", "what is this?"])
    assert capsys.readouterr().out == "a red picture.\n"
    text = tok.decode(seen["ids"].tolist())
    assert text == (f"<s>{SYSTEM_MESSAGES['academic']}[USER]:[IMG]" + "<image>" * 16 + "[/IMG]what is this?"
                    f"[ASSISTANT]:")
    assert torch.equal(seen["images"][0], to_pixels(picture, 64)) and seen["max_new_tokens"] == 5
    assert seen["eos"] == tok.ids.eos
    weights = ["--weights", str(tmp_path / "ckpt")]
    for argv, code, message in (
            (["--preset", "debug-chat", *weights, "--image", str(tmp_path / "none.png"), "hi"], 1, "No such file"),
            (["--preset", "debug-chat", *weights, "--image", str(tmp_path / "ckpt" / ".metadata"), "hi"], 1,
             "cannot identify image"),
            (["--preset", "debug", *weights, "hi"], 2, "invalid choice: 'debug'"),
            (["--preset", "debug-chat", *weights, "  "], 2, "the question is blank")):
        with pytest.raises(SystemExit) as exit_info:
            chat.main(argv)
        assert exit_info.value.code == code
        assert message in capsys.readouterr().err


def test_other_image_asks_each_question_about_the_previous_image(heldout):
    tok = Emu2Tokenizer(chat=True)
    builder = SampleBuilder(tok, 16)
    asked = []
    got = evaluate_vqa(heldout, builder, lambda s: asked.append(s) or "x", "chat", other_image=True)
    assert got["questions"] == len(heldout) - 1 == len(asked)
    for k, sample in enumerate(asked):
        assert torch.equal(sample.images[0], heldout[k].image)
        assert heldout[k + 1].question in tok.decode(sample.input_ids.tolist())


def test_rices_picks_the_most_similar_images_nearest_last(heldout):
    """A query whose image is one of the support's gets that record as its last (nearest)
    example, with its most common answer; the few-shot prompt holds the examples' answers and
    the query's question, and ends at "short answer:"."""
    from emu2_engine.evaluate import Rices, vqa_prompt

    torch.manual_seed(0)
    model = Emu2Model(Emu2Config.from_preset("debug"))
    model.init_weights()
    model.eval()
    support = [VQA(f"s{k}", r.image, r.question, ["dark red", r.answers[0], r.answers[0]])
               for k, r in enumerate(heldout)]
    rices = Rices(model, support, k=3)
    for j in (0, 4):
        shots = rices(heldout[j])
        assert len(shots) == 3 and torch.equal(shots[-1][0], heldout[j].image)
        assert shots[-1][1:] == (heldout[j].question, heldout[j].answers[0])
        features = rices.features @ rices.features[j]
        assert [torch.equal(s[0], support[int(i)].image) for s, i in
                zip(shots, features.topk(3).indices.flip(0))] == [True] * 3
    tok = Emu2Tokenizer()
    sample = vqa_prompt(SampleBuilder(tok, 16), heldout[1], "few-shot", rices)
    text = tok.decode(sample.input_ids.tolist())
    assert len(sample.images) == 4 and text.endswith(f"{heldout[1].question} short answer:")
    assert text.count("short answer:") == 4 and f"short answer: {heldout[1].answers[0]}." in text
    with pytest.raises(ValueError, match=r"few-shot needs 1 <= shots <= the 6 support records, got 7"):
        Rices(model, support, k=7)
    with pytest.raises(ValueError, match="needs shots"):
        vqa_prompt(SampleBuilder(tok, 16), heldout[1], "few-shot")


def test_edit_evaluation_distances(monkeypatch):
    """`evaluate_edits` on hand-made edits: the generated embeddings are compared with the
    edited image's pooled features, the source's features are the do-nothing reference, and the
    control uses the previous edit's instruction; the prompt ends at the edited image's [IMG]."""
    from emu2_engine.data.records import Edit
    from emu2_engine.evaluate import evaluate_edits
    from emu2_engine.inference import generate

    torch.manual_seed(0)
    model = Emu2Model(Emu2Config.from_preset("debug"))
    model.init_weights()
    model.eval()
    tok = Emu2Tokenizer()
    builder = SampleBuilder(tok, 16)
    edits = [Edit(f"e{k}", torch.randn(3, 64, 64), f"make shape {k} blue.", torch.randn(3, 64, 64))
             for k in range(4)]
    seen = []

    def fake(model, ids, images):  # the target's own features when asked with the right instruction
        text = tok.decode(ids.tolist())
        record = next(e for e in edits if torch.equal(images[0], e.image))
        seen.append(text)
        right = record.instruction in text
        return model.encode_images(record.edited[None])[0] + (0.0 if right else 1.0)

    monkeypatch.setattr(generate, "generate_image_embeddings", fake)
    got = evaluate_edits(model, builder, edits)
    assert got["edits"] == 3 and got["generated"] == pytest.approx(0.0, abs=1e-10)
    assert got["other_instruction"] == pytest.approx(1.0, rel=1e-5)
    with torch.no_grad():
        want = sum(float((model.encode_images(e.image[None]) - model.encode_images(e.edited[None])).square().mean())
                   for e in edits[1:]) / 3
    assert got["source"] == pytest.approx(want, rel=1e-5)
    assert all(t.startswith("<s>[IMG]") and t.endswith("[IMG]") and t.count("[IMG]") == 2 for t in seen)
    assert "make shape 0 blue." in seen[1]  # edit 1's control: edit 0's instruction
    with pytest.raises(ValueError, match="no edit to evaluate"):
        evaluate_edits(model, builder, edits[:1])


def test_answers_drop_special_tokens_and_exact_match_uses_the_most_common_answer(monkeypatch):
    """The decoded answer leaves out `</s>` and other special tokens; `exact` compares with the
    most common human answer, not the first."""
    from emu2_engine.evaluate import answer_greedily
    from emu2_engine.inference import generate

    tok = Emu2Tokenizer()
    monkeypatch.setattr(generate, "generate_text", lambda *a, **k: torch.tensor(
        tok.encode("red", special=False) + [tok.ids.img_end, tok.ids.eos]))
    model = Emu2Model(Emu2Config.from_preset("debug"))
    builder = SampleBuilder(tok, 16)
    record = VQA("k", torch.zeros(3, 64, 64), "what colour?", ["dark red", "red", "red"])
    answer = answer_greedily(model, tok, max_new_tokens=4)
    assert answer(builder.build_vqa(record.image, record.question)) == "red"
    got = evaluate_vqa([record], builder, answer, "zero-shot")
    # leave-one-out over 3 human answers: (2/3 + 1/3 + 1/3) / 3
    assert got["exact"] == 1.0 and got["accuracy"] == pytest.approx(4 / 9)


def test_a_run_folder_gives_its_newest_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Emu2Model(Emu2Config.from_preset("debug"))
    model.init_weights()
    save_model_weights(model, step_folder(tmp_path / "run" / "checkpoints", 3), step=3)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_model_weights(model, step_folder(tmp_path / "run" / "checkpoints", 12), step=12)
    assert torch.equal(load_model("debug", tmp_path / "run").lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("device, message", [("cuda", "this machine has no CUDA device"),
                                             ("tpu", "not a device|must be cpu or cuda")])
def test_devices_that_cannot_run_are_argument_errors(device, message, capsys):
    from emu2_engine.evaluate import check_device

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert re.search(message, check_device(device))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--preset", "debug", "--weights", "x", "--device", device])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert check_device("cpu") == ""
