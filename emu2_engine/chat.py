"""Ask a chat-tuned model about an image (`python -m emu2_engine.chat`).

    python -m emu2_engine.chat --preset debug-chat --weights runs/chat_debug \\
        --image photo.jpg "what colour is the circle?"

The question is laid out with Emu2-Chat's template (`SampleBuilder.build_chat`: the system
message, `[USER]: `, the image, the question, ` [ASSISTANT]:`), answered greedily over the KV
cache (`inference.generate.generate_text`) and printed. Without `--image` it is a text-only
instruction. `--weights` takes what `evaluate.py` takes: a run folder, a checkpoint folder or a
weights file or folder.
"""

from __future__ import annotations

import sys

from PIL import Image

from emu2_engine.cli import ArgumentParser
from emu2_engine.data.records import CHAT_SYSTEMS
from emu2_engine.data.sequences import SampleBuilder, to_pixels
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models import PRESETS


def answer(model, tokenizer, question: str, image: Image.Image | None = None, system: str = "chat",
           max_new_tokens: int = 64) -> str:
    """The model's greedy answer to `question` (about `image`, when given)."""
    from emu2_engine.evaluate import answer_greedily

    cfg = model.cfg
    builder = SampleBuilder(tokenizer, cfg.n_query, frame_n_query=cfg.frame_queries)
    images = [] if image is None else [to_pixels(image, cfg.vision.image_size)]
    # markers=False: the image goes first, and a "<image>" written in the question stays text
    prompt = builder.build_chat(system, [(question, None)], images, markers=False)
    return answer_greedily(model, tokenizer, max_new_tokens)(prompt)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m emu2_engine.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question", help="the instruction or question")
    parser.add_argument("--preset", required=True, choices=sorted(n for n, c in PRESETS.items() if c.chat),
                        help="a preset with the chat vocabulary")
    parser.add_argument("--weights", required=True, help="run folder, checkpoint folder or weights file")
    parser.add_argument("--image", default="", help="an image file (JPEG, PNG, WebP)")
    parser.add_argument("--system", choices=CHAT_SYSTEMS, default="chat",
                        help="chat (comprehensive answers) or academic (short answers)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not args.question.strip():
        parser.error("the question is blank")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from emu2_engine.evaluate import check_device, load_model

    problem = check_device(args.device)
    if problem:
        parser.error(problem)
    from emu2_engine.pretrain import one_line

    try:
        image = None
        if args.image:
            with Image.open(args.image, formats=("JPEG", "PNG", "WEBP")) as opened:
                image = opened.convert("RGB")
        model = load_model(args.preset, args.weights, args.device)
        tokenizer = Emu2Tokenizer(chat=True)
        print(answer(model, tokenizer, args.question, image, args.system, args.max_new_tokens))
    except (OSError, ValueError, RuntimeError) as e:  # PIL's UnidentifiedImageError is an OSError
        print(f"python -m emu2_engine.chat: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
