"""Evaluate a trained model (`python -m emu2_engine.evaluate`): VQA accuracy from its greedy
answers, or how close the visual embeddings it generates for image edits come to the edited
images'.

    python -m emu2_engine.evaluate --preset debug-chat --weights runs/chat_debug
    python -m emu2_engine.evaluate --preset debug --weights runs/debug --prompt zero-shot
    python -m emu2_engine.evaluate --task edit --preset debug --weights runs/gen_debug

Reads VQA records (`--data`: shards of the vqa kind; by default the shapes world's held-out
split, generated on first use as the trainer does), lays each question out as the model was
trained to read it, answers greedily (`inference.generate.generate_text`, at most
`--max-new-tokens`, stopping at `</s>`) and scores the answers with VQAv2's accuracy.

- `--prompt chat` (the default for a preset with the chat vocabulary): Emu2-Chat's academic-task
  conversation, the question and LLaVA-1.5's short-answer instruction after the image, ending
  `[ASSISTANT]:` (`SampleBuilder.build_chat`, the layout `data.template = "chat"` trains on).
- `--prompt zero-shot` (the default otherwise): the paper's zero-shot evaluation prompt,
  `[image]based on the picture, answer in one word or phrase. {question} short answer:`
  (`SampleBuilder.build_vqa`).
- `--prompt few-shot`: the paper's few-shot protocol: `--shots` examples `[image]based on the
  picture, {q} short answer: {a}` joined by ". ", then the query with that prompt; the examples
  are chosen by RICES (retrieval of the training examples whose images are most similar, by the
  cosine of the model's own pooled visual features; Flamingo and the Emu2 paper use CLIP image
  features, and the encoder here is EVA-CLIP) from the first `--support` records of the
  training split, each example's answer its most common human answer.
- Accuracy: VQAv2's, an answer scores min(1, humans who gave it / 3), averaged over the ten
  leave-one-out subsets of the ten human answers (Antol et al. 2015, and the VQA evaluation
  code's averaging); answers are compared after `normalize_answer`, which applies the
  official normalisation's main steps (lower case, punctuation, articles, number words to
  digits) but not its contraction table.

`--task edit`: for each held-out edit (`--data`: shards of the edit kind; by default the
shapes world's), the model generates the edited image's visual embeddings after
`[IMG]source[/IMG]instruction[IMG]` (`inference.generate.generate_image_embeddings`, the
training layout's prompt), and the mean squared distance to the edited image's own pooled
features (the regression target) is reported beside two references: the source image's features
(an edit that changes nothing), and the embeddings generated with another edit's instruction
(a model that ignores the instruction scores the same).

`--weights` is an engine checkpoint folder (`<run>/checkpoints/step-NNNNNN`), a run folder
(its newest complete checkpoint), or a weights file or folder (the engine's state dict or the
released Emu2 weights), as `checkpoint.init_from` takes them.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from emu2_engine.cli import ArgumentParser
from emu2_engine.data.records import VQA, Edit
from emu2_engine.data.sequences import SampleBuilder
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models import PRESETS, Emu2Config, Emu2Model

PROMPTS = ("chat", "zero-shot", "few-shot")

_NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# The marks the VQA evaluation treats as punctuation (not ' : % # $ &, which stay), deleted
# where one touches a space or the answer writes a number with a thousands comma ("1,000"), else
# replaced by a space ("t-shirt" -> "t shirt").
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!")
_THOUSANDS = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit: "2.5" keeps its point


def normalize_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it (Antol et al. 2015; the official evaluation
    code's steps): newlines and tabs as spaces; punctuation deleted or spaced (`_PUNCTUATION`);
    full stops dropped unless a digit follows; lower case; number words zero to ten and "none"
    as digits; the articles a, an, the dropped; single spaces. Not done: the official contraction
    table ("dont" -> "don't", ...), and the official code's skipping of the human answers'
    normalisation when all ten are identical."""
    text = original = answer.replace("\n", " ").replace("\t", " ").strip()
    delete = _THOUSANDS.search(original) is not None
    for mark in _PUNCTUATION:  # each decided on the answer as written
        if delete or f"{mark} " in original or f" {mark}" in original:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(answer: str, human_answers: list[str]) -> float:
    """VQAv2's accuracy of one answer against the (ten) human answers: the mean, over each
    human answer left out in turn, of min(1, matches among the others / 3)."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    mine = normalize_answer(answer)
    same = [normalize_answer(h) == mine for h in human_answers]
    total = sum(same)
    return sum(min(1.0, (total - s) / 3.0) for s in same) / len(same)


def check_device(device: str) -> str:
    """"" when `device` can run here, else why not (one line)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        return f"--device {device!r} is not a device ({e})"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device!r}: this machine has no CUDA device"
    if kind not in ("cpu", "cuda"):
        return f"--device must be cpu or cuda[:N], got {device!r}"
    return ""


def load_model(preset: str, weights: str | Path, device: str | torch.device = "cpu") -> Emu2Model:
    """The `preset` model with `weights` loaded (see the module docstring), in eval mode."""
    from emu2_engine.checkpoint.dcp import is_checkpoint_folder, latest, load_model_weights
    from emu2_engine.checkpoint.released import holds_released_names, load_released_weights, load_weights

    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--weights {str(weights)!r} does not exist: expected a run folder, "
                                f"a checkpoint folder or a weights file or folder")
    if not is_checkpoint_folder(path) and (path / "checkpoints").is_dir():
        newest = latest(path / "checkpoints")
        if newest is None:
            raise ValueError(f"run folder {str(path)!r} has no complete checkpoint in {path / 'checkpoints'}")
        path = newest
    with torch.device("meta"):
        model = Emu2Model(Emu2Config.from_preset(preset))
    model.to_empty(device=device)  # every tensor is overwritten by the load (or it fails)
    if is_checkpoint_folder(path):
        load_model_weights(path, model)
    elif holds_released_names(path):
        load_released_weights(model, path)
    else:
        load_weights(model, path)
    return model.eval()


def vqa_prompt(builder: SampleBuilder, record: VQA, prompt: str, shots: Callable | None = None):
    """The Sample a model answers `record` after (see the module docstring); for few-shot,
    `shots(record)` gives the examples [(image, question, answer)]."""
    if prompt == "chat":
        return builder.build_chat_record(record, prompt_only=True)
    if prompt == "zero-shot":
        return builder.build_vqa(record.image, record.question)
    if prompt == "few-shot":
        if shots is None:
            raise ValueError("the few-shot prompt needs shots (a function giving each record's examples)")
        return builder.build_vqa(record.image, record.question, shots=shots(record))
    raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")


class Rices:
    """Retrieval-based in-context example selection: for a query, the `k` support records whose
    images' mean pooled visual features (`Emu2Model.encode_images`) are nearest by cosine, the
    most similar last (nearest the query), each with its most common human answer."""

    def __init__(self, model: Emu2Model, support: list[VQA], k: int, batch: int = 32):
        if k < 1 or k > len(support):
            raise ValueError(f"few-shot needs 1 <= shots <= the {len(support)} support records, got {k}")
        self.model, self.support, self.k = model, support, k
        self.features = torch.cat([self._features(torch.stack([r.image for r in support[i:i + batch]]))
                                   for i in range(0, len(support), batch)])

    @torch.no_grad()
    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        device = self.model.lm_head.weight.device
        pooled = self.model.encode_images(pixels.to(device)).float().mean(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def __call__(self, record: VQA) -> list[tuple[torch.Tensor, str, str]]:
        similarity = self.features @ self._features(record.image[None])[0]
        nearest = similarity.topk(self.k).indices.flip(0).tolist()
        return [(self.support[i].image, self.support[i].question,
                 Counter(self.support[i].answers).most_common(1)[0][0]) for i in nearest]


def answer_greedily(model: Emu2Model, tokenizer, max_new_tokens: int) -> Callable:
    """answer(sample) -> text: greedy decoding after the sample's ids, `</s>` and the special
    tokens dropped."""
    from emu2_engine.inference.generate import generate_text

    device = model.lm_head.weight.device

    def answer(sample) -> str:
        images = torch.stack(sample.images).to(device) if sample.images else None
        ids = generate_text(model, torch.as_tensor(sample.input_ids), images,
                            max_new_tokens=max_new_tokens, eos_id=tokenizer.ids.eos)
        return tokenizer.decode(ids.tolist(), skip_special=True).strip()

    return answer


def evaluate_vqa(records: Iterable[VQA], builder: SampleBuilder, answer: Callable, prompt: str,
                 limit: int | None = None, show: Callable[[str], None] | None = None,
                 other_image: bool = False, shots: Callable | None = None) -> dict:
    """{"questions", "accuracy", "exact"} over `records` (at most `limit`): the mean VQA
    accuracy and the share of answers equal (normalised) to the most common human answer.
    `other_image`: each question is asked about the previous record's image (the first record
    only lends its image): a model that reads its images scores lower so; one that answers from
    the question alone scores the same."""
    n, accuracy, exact = 0, 0.0, 0
    previous = None
    for record in records:
        if limit is not None and n >= limit:
            break
        if other_image:
            record, previous = dataclasses.replace(record, image=previous), record.image
            if record.image is None:
                continue
        said = answer(vqa_prompt(builder, record, prompt, shots))
        score = vqa_accuracy(said, record.answers)
        top = Counter(normalize_answer(a) for a in record.answers).most_common(1)[0][0]
        exact += normalize_answer(said) == top
        accuracy += score
        n += 1
        if show is not None:
            show(f"{record.question!r}: {said!r} (humans: {top!r}; accuracy {score:.2f})")
    if n == 0:
        raise ValueError("no VQA record to evaluate")
    return {"questions": n, "accuracy": accuracy / n, "exact": exact / n}


def shapes_world_shards(cache_dir: str, seed: int, kind: str = "vqa", split: str = "heldout") -> Path:
    """The shapes world's shards of `kind` and `split` (generated on first use)."""
    from emu2_engine.data.make_shapes import ensure_shapes_world

    return ensure_shapes_world(Path(cache_dir).expanduser(), seed=seed) / kind / split


@torch.no_grad()
def evaluate_edits(model: Emu2Model, builder: SampleBuilder, records: Iterable[Edit],
                   limit: int | None = None) -> dict:
    """{"edits", "generated", "source", "other_instruction"}: mean squared distances, per
    embedding element, to each edited image's pooled features (`Emu2Model.encode_images`) of
    the embeddings generated after `[IMG]source[/IMG]instruction[IMG]`, of the source image's
    features, and of the embeddings generated with the previous record's instruction (the first
    record only lends its instruction)."""
    from emu2_engine.inference.generate import generate_image_embeddings

    device = model.lm_head.weight.device

    def generated(record: Edit, instruction: str) -> torch.Tensor:
        sample = builder.build_edit(record.image, instruction, record.edited)
        prompt = torch.as_tensor(sample.input_ids[:sample.image_starts[1] + 1])  # through the 2nd [IMG]
        return generate_image_embeddings(model, prompt, record.image[None].to(device)).float()

    n, sums, previous = 0, {"generated": 0.0, "source": 0.0, "other_instruction": 0.0}, None
    for record in records:
        if limit is not None and n >= limit:
            break
        if previous is None:
            previous = record.instruction
            continue
        target, source = model.encode_images(torch.stack([record.edited, record.image]).to(device)).float()
        sums["generated"] += float((generated(record, record.instruction) - target).square().mean())
        sums["source"] += float((source - target).square().mean())
        sums["other_instruction"] += float((generated(record, previous) - target).square().mean())
        previous = record.instruction
        n += 1
    if n == 0:
        raise ValueError("no edit to evaluate (the first record only lends its instruction)")
    return {"edits": n, **{k: v / n for k, v in sums.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m emu2_engine.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("vqa", "edit"), default="vqa",
                        help="vqa (greedy answers, VQAv2 accuracy) or edit (generated embeddings of edited images)")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the model's preset")
    parser.add_argument("--weights", required=True, help="run folder, checkpoint folder or weights file")
    parser.add_argument("--data", default="", help="vqa or edit shards (default: the shapes world's held-out split)")
    parser.add_argument("--support-data", default="",
                        help="vqa shards the few-shot examples come from (default: the shapes world's training split)")
    parser.add_argument("--shots", type=int, default=4, help="few-shot examples per question (default 4)")
    parser.add_argument("--support", type=int, default=200,
                        help="training records the few-shot examples are retrieved from (default 200)")
    parser.add_argument("--prompt", choices=PROMPTS, default=None,
                        help="chat (default for chat presets), zero-shot (default otherwise) or few-shot")
    parser.add_argument("--limit", type=int, default=100, help="questions or edits (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234, help="the shapes world's seed (data.seed)")
    parser.add_argument("--cache-dir", default="~/.cache/emu2_engine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", action="store_true", help="print every question and answer")
    parser.add_argument("--other-image", action="store_true",
                        help="ask each question about the previous question's image (a control)")
    args = parser.parse_args(argv)
    if min(args.limit, args.max_new_tokens, args.shots, args.support) < 1:
        parser.error(f"--limit, --max-new-tokens, --shots and --support must be >= 1, got {args.limit}, "
                     f"{args.max_new_tokens}, {args.shots} and {args.support}")
    problem = check_device(args.device)
    if problem:
        parser.error(problem)
    if args.task == "edit" and (args.prompt or args.other_image or args.show or args.support_data):
        parser.error("--prompt, --other-image, --show and --support-data are for --task vqa")
    cfg = PRESETS[args.preset]
    prompt = args.prompt or ("chat" if cfg.chat else "zero-shot")
    if prompt == "chat" and not cfg.chat:
        parser.error(f"--prompt chat needs a preset with the chat vocabulary ([USER], [ASSISTANT]); "
                     f"{args.preset} has none")
    from emu2_engine.data.decode import Decoder
    from emu2_engine.data.shards import ShardStream
    from emu2_engine.pretrain import one_line

    try:
        model = load_model(args.preset, args.weights, args.device)
        tokenizer = Emu2Tokenizer(chat=cfg.chat)
        builder = SampleBuilder(tokenizer, cfg.n_query, frame_n_query=cfg.frame_queries)
        if args.task == "edit":
            shards = args.data or shapes_world_shards(args.cache_dir, args.seed, "edit")
            stream = ShardStream(shards, Decoder("edit", cfg.vision.image_size, log=None), shuffle=False,
                                 log=None, epochs=1)
            result = evaluate_edits(model, builder, stream, args.limit)
            print(f"edits ({result['edits']}): mean squared distance to the edited image's features: "
                  f"generated {result['generated']:.4f}, the source image's {result['source']:.4f}, "
                  f"generated with another edit's instruction {result['other_instruction']:.4f}")
            return
        decoder = Decoder("vqa", cfg.vision.image_size, log=None)
        shards = args.data or shapes_world_shards(args.cache_dir, args.seed)
        stream = ShardStream(shards, decoder, shuffle=False, log=None, epochs=1)
        shots = None
        if prompt == "few-shot":
            support_shards = args.support_data or shapes_world_shards(args.cache_dir, args.seed, "vqa", "train")
            support = list(itertools.islice(ShardStream(support_shards, decoder, shuffle=False, log=None,
                                                        epochs=1), args.support))
            shots = Rices(model, support, args.shots)
        result = evaluate_vqa(stream, builder, answer_greedily(model, tokenizer, args.max_new_tokens),
                              prompt, args.limit, show=print if args.show else None,
                              other_image=args.other_image, shots=shots)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"python -m emu2_engine.evaluate: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    images = ", each about the previous question's image" if args.other_image else ""
    prompt = f"{args.shots}-shot RICES" if prompt == "few-shot" else prompt
    print(f"VQA ({prompt} prompt, greedy, {result['questions']} questions{images}): accuracy "
          f"{100 * result['accuracy']:.1f} %, exact match with the most common answer "
          f"{100 * result['exact']:.1f} %")


if __name__ == "__main__":
    main()
