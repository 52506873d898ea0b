"""The shapes world: a seeded, procedural image-caption generator (the embedded dataset).

Each sample is 1-3 coloured shapes (circle, square, triangle; six colours) on a plain or
lightly textured background, with a caption a small model can learn to predict from the
pixels: colour, kind, count and coarse position, e.g.
"a picture of two red circles, one on the left and one at the top, and a blue square at the
bottom right."

Layout is decided on a 3x3 grid: every shape sits inside its own cell, so shapes never
overlap and each one's position word ("top left", "centre", ...) is unambiguous. Shapes of
the same colour and kind are grouped and counted. Everything about sample `index` comes from
`numpy.random.default_rng([seed, index])`: the same (seed, index) gives the same pixels and
caption on every machine, in any order, in any worker. The layout and caption are drawn
before anything about the pixels, so `caption()` (no drawing) agrees with `sample()`.

Edits (`ShapesWorld.edit`, InstructPix2Pix-style): a source image, an instruction ("make
the red circle blue.", "remove the green square.", "move the yellow triangle to the top
right.", "add an orange circle on the left.") and the edited image, drawn on the same
background pixels with the same shapes except the one the instruction names.

Generation is separate from any file format: the shard writer stores what `sample()` returns.
Speed (`python -m emu2_engine.data.shapes`): about 9,000 images/s at 64 px and 470 at 448 px
on one core of the 2-core development machine (AMD EPYC, no GPU).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
# Light backgrounds, far from every shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "grey": (205, 205, 205),
    "beige": (240, 230, 205),
    "pale blue": (215, 230, 245),
}
TEXTURES = ("plain", "noise", "gradient")
# Coarse positions: cell (row, col) of a 3x3 grid -> the words for it.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
_READING_ORDER = {pos: i for i, pos in enumerate(POSITIONS.values())}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption openings; `{d}` is the description. Few and fixed, so the phrasing stays learnable.
TEMPLATES = ("{d}.", "a picture of {d}.", "an image of {d}.", "there {be} {d}.")
MAX_SHAPES = 3
COLOUR_JITTER = 12  # +- per channel, so pixels are not all one exact value
# Video motions: (from, to) sides, or None for growing and shrinking in place.
MOTIONS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"), None)
MAX_DOCUMENT_IMAGES = 3  # at most 3 x MAX_SHAPES = 9 shapes, so the total is a number word
DOCUMENT_OPENINGS = ("here are some pictures of shapes.", "a page of shape pictures.",
                     "look at these pictures.")
# A chat's first instruction: a request for a description, answered with the caption.
DESCRIPTION_REQUESTS = ("describe the image.", "describe this picture.", "what is in this picture?",
                        "what do you see?")
MAX_CHAT_TURNS = 3
EDIT_OPERATIONS = ("recolour", "remove", "move", "add")
# Recolour instructions; `{t}` names the shape ("the red circle"), `{c}` the new colour. The
# tokenizer corpus has both phrasings ("make the circle red.", "change the colour of ...").
RECOLOUR_PHRASINGS = ("make {t} {c}.", "change the colour of {t} to {c}.")
# Random streams of the sample types other than plain images (see ShapesWorld.stream_rng).
# New types take the next number: the items of the existing ones stay as they are.
STREAM_VIDEO, STREAM_GROUNDED, STREAM_VQA, STREAM_DOCUMENT, STREAM_TEXT, STREAM_CHAT = 1, 2, 3, 4, 5, 6
STREAM_EDIT = 7


@dataclass(frozen=True)
class Shape:
    """One drawn shape: what it is, where it is (pixels of the drawn image) and its cell."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive-exclusive
    position: str  # a value of POSITIONS, e.g. "top left"


@dataclass(frozen=True)
class ShapesSample:
    """One image-caption sample of the shapes world."""

    image: Image.Image
    caption: str
    shapes: tuple[Shape, ...]
    background: str
    texture: str


@dataclass(frozen=True)
class ShapesVideo:
    """A short video: one shape moving across a plain background, or growing and shrinking."""

    frames: tuple[Image.Image, ...]
    caption: str


@dataclass(frozen=True)
class GroundedPhrase:
    """A noun phrase of a caption, caption[start:end], and the boxes of the shapes it names,
    (x0, y0, x1, y1) in [0, 1] image coordinates."""

    start: int
    end: int
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True)
class ShapesGrounded:
    """An image-caption sample whose noun phrases are tied to boxes (GRIT-style grounding)."""

    sample: ShapesSample
    phrases: tuple[GroundedPhrase, ...]


@dataclass(frozen=True)
class ShapesVQA:
    """A question about an image with ten annotators' answers, as VQAv2 has them."""

    sample: ShapesSample
    question: str
    answer: str
    """The most common answer (VQAv2's `multiple_choice_answer`)."""
    answers: tuple[str, ...]


@dataclass(frozen=True)
class ShapesChat:
    """A conversation about one image: (instruction, answer) turns, the instructions without
    image markers (the shard writer puts the image's before the first)."""

    sample: ShapesSample
    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ShapesEdit:
    """An image edit: `source` changed as `instruction` says gives `edited` (same background
    pixels; every shape but the one edited drawn the same). `operation` is one of
    EDIT_OPERATIONS; each image's caption describes that image."""

    source: ShapesSample
    instruction: str
    edited: ShapesSample
    operation: str


@dataclass(frozen=True)
class _Scene:
    """Everything `_draw` decides before drawing the shapes: editing a scene and drawing it
    again changes nothing else."""

    layout: tuple[tuple, ...]  # (kind, colour, cell, (cx, cy), size) per shape, unit coordinates
    fills: tuple[tuple[int, int, int], ...]  # each shape's jittered colour
    template: str  # the caption opening, a value of TEMPLATES
    background: str
    texture: str
    canvas: Image.Image  # the background pixels (copied before drawing on)


@dataclass(frozen=True)
class ShapesDocument:
    """An interleaved document: sentences and images in reading order."""

    items: tuple[str | ShapesSample, ...]


def _unit_shapes(layout: list[tuple]) -> list[Shape]:
    """Shapes of a layout before drawing (no pixel box yet): enough to describe them."""
    return [Shape(kind, colour, (0, 0, 0, 0), POSITIONS[cell]) for kind, colour, cell, _, _ in layout]


def position_phrase(position: str) -> str:
    """The words placing something at `position`: "on the left", "at the top right", ..."""
    if position in ("left", "right"):
        return f"on the {position}"
    if position == "centre":
        return "in the centre"
    return f"at the {position}"


def plural(kind: str) -> str:
    return kind + "s"


def noun_phrase(colour: str, kind: str, count: int) -> str:
    """ "a red circle", "an orange square", "two blue triangles"."""
    if count == 1:
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {kind}"
    return f"{NUMBERS[count]} {colour} {plural(kind)}"


def join_words(parts: list[str]) -> str:
    """ "a", "a and b", "a, b and c" (parts ending in a comma bring their own)."""
    if len(parts) == 1:
        return parts[0]
    head = "".join(p + (" " if p.endswith(",") else ", ") for p in parts[:-2]) + parts[-2]
    return f"{head} and {parts[-1]}"


def describe(shapes: tuple[Shape, ...] | list[Shape]) -> str:
    """The description of a set of shapes, without an opening or a full stop.

    Shapes of one colour and kind form a group, counted; a group's positions follow it in
    reading order (top to bottom, then left to right); groups are listed in the reading
    order of their first shape.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for s in sorted(shapes, key=lambda s: _READING_ORDER[s.position]):
        groups.setdefault((s.colour, s.kind), []).append(s.position)
    parts = []
    for (colour, kind), positions in groups.items():
        if len(positions) == 1:
            parts.append(f"{noun_phrase(colour, kind, 1)} {position_phrase(positions[0])}")
        else:  # "two red circles, one on the left and one at the top,"
            where = join_words([f"one {position_phrase(p)}" for p in positions])
            parts.append(f"{noun_phrase(colour, kind, len(positions))}, {where},")
    return join_words(parts).rstrip(",")


def caption_text(shapes: tuple[Shape, ...] | list[Shape], template: str) -> str:
    """The caption of `shapes` with opening `template` (a value of TEMPLATES)."""
    # "there is/are" agrees with the first group (describe() lists the top-left-most first).
    first = min(shapes, key=lambda s: _READING_ORDER[s.position])
    first_count = sum(s.colour == first.colour and s.kind == first.kind for s in shapes)
    return template.format(d=describe(shapes), be="is" if first_count == 1 else "are")


def jittered(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The RGB fill of a shape of `colour`: each channel moved by up to COLOUR_JITTER."""
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))


def pixel_box(centre: tuple[float, float], size: float, image_size: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) of a square of side `size` (a fraction of the image)
    centred at `centre` (unit coordinates)."""
    (cx, cy), half = centre, size * image_size / 2
    return (int(round(cx * image_size - half)), int(round(cy * image_size - half)),
            int(round(cx * image_size + half)), int(round(cy * image_size + half)))


def shape_reference(layout: list[tuple] | tuple[tuple, ...], i: int) -> str:
    """Words naming shape `i` of a layout among the others: "the red circle", or with its
    position when another shape has its colour and kind ("the red circle on the left")."""
    kind, colour, cell = layout[i][:3]
    same = sum(k == kind and c == colour for k, c, *_ in layout)
    return f"the {colour} {kind}" + (f" {position_phrase(POSITIONS[cell])}" if same > 1 else "")


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int],
               fill: tuple[int, int, int]) -> None:
    """Draw one shape filling the pixel box (x0, y0, x1, y1), inclusive-exclusive."""
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def questions(shapes: tuple[Shape, ...] | list[Shape], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Question-answer pairs about a set of shapes (counting, colour, position, presence)."""
    qa = []
    kind = str(rng.choice(KINDS))
    n = sum(s.kind == kind for s in shapes)
    qa.append((f"how many {plural(kind)} are there?", NUMBERS[n]))
    colour = str(rng.choice(list(COLOURS)))
    n = sum(s.colour == colour for s in shapes)
    qa.append((f"how many {colour} shapes are there?", NUMBERS[n]))
    qa.append(("how many shapes are there?", NUMBERS[len(shapes)]))
    s = shapes[int(rng.integers(len(shapes)))]
    qa.append((f"what colour is the {s.kind} {position_phrase(s.position)}?", s.colour))
    qa.append((f"what shape is {position_phrase(s.position)}?", s.kind))
    qa.append((f"where is the {s.colour} {s.kind}?", position_phrase(s.position)))
    colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(KINDS))
    present = any(t.colour == colour and t.kind == kind for t in shapes)
    qa.append((f"is there {noun_phrase(colour, kind, 1)}?", "yes" if present else "no"))
    return qa


def _check_image_size(image_size: int) -> None:
    if image_size < 16:
        raise ValueError(f"ShapesWorld image_size must be >= 16 pixels, got {image_size}")


def grounded_phrases(sample: ShapesSample) -> tuple[GroundedPhrase, ...]:
    """The noun phrases of `sample.caption` ("two red circles") as character spans, in
    caption order, each with the boxes of the shapes it names, in [0, 1] image coordinates.

    The groups are those of `describe` (same colour and kind, reading order), so every
    phrase is found in the caption after the previous one."""
    width, height = sample.image.size
    groups: dict[tuple[str, str], list[Shape]] = {}
    for s in sorted(sample.shapes, key=lambda s: _READING_ORDER[s.position]):
        groups.setdefault((s.colour, s.kind), []).append(s)
    phrases, cursor = [], sample.caption.index(describe(sample.shapes))
    for (colour, kind), members in groups.items():
        noun = noun_phrase(colour, kind, len(members))
        start = sample.caption.index(noun, cursor)
        cursor = start + len(noun)
        boxes = tuple((s.box[0] / width, s.box[1] / height, s.box[2] / width, s.box[3] / height)
                      for s in members)
        phrases.append(GroundedPhrase(start, cursor, boxes))
    return tuple(phrases)


def answer_variant(answer: str) -> str:
    """Another way an annotator writes `answer`: a digit for a number word, the bare
    position for a position phrase ("on the left" -> "left"); else the answer itself."""
    if answer in NUMBERS:
        return str(NUMBERS.index(answer))
    for prefix in ("on the ", "at the ", "in the "):
        if answer.startswith(prefix):
            return answer[len(prefix):]
    return answer


def vqa_answers(answer: str, rng: np.random.Generator, n: int = 10,
                p_variant: float = 0.2) -> tuple[str, ...]:
    """`n` annotators' answers to a question whose answer is `answer`: each writes it as
    is, or with probability `p_variant` in another phrasing (`answer_variant`)."""
    variant = answer_variant(answer)
    return tuple(variant if rng.random() < p_variant else answer for _ in range(n))


class ShapesWorld:
    """The seeded generator: `sample(index, image_size)` draws sample `index` of the world."""

    def __init__(self, seed: int = 0):
        if seed < 0:
            raise ValueError(f"ShapesWorld seed must be >= 0, got {seed}")
        self.seed = seed

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample `index` (independent of every other index)."""
        if index < 0:
            raise ValueError(f"ShapesWorld sample index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, index])

    @staticmethod
    def _layout(rng: np.random.Generator) -> tuple[list[tuple], str]:
        """Shapes in unit coordinates (kind, colour, cell, centre, size) and the caption."""
        layout, template = ShapesWorld._place(rng)
        return layout, caption_text(_unit_shapes(layout), template)

    @staticmethod
    def _place(rng: np.random.Generator) -> tuple[list[tuple], str]:
        """Shapes in unit coordinates (kind, colour, cell, centre, size) and the caption's
        opening (a value of TEMPLATES)."""
        n = int(rng.integers(1, MAX_SHAPES + 1))
        cells = rng.choice(len(POSITIONS), size=n, replace=False)
        colours = list(COLOURS)
        # Drawing from few colours/kinds makes groups ("two red circles") common.
        palette = rng.choice(len(colours), size=2, replace=False)
        kinds = rng.choice(len(KINDS), size=2, replace=False)
        layout = []
        for cell in cells:
            row, col = divmod(int(cell), 3)
            c = palette[rng.integers(2)] if rng.random() < 0.7 else rng.integers(len(colours))
            k = kinds[rng.integers(2)] if rng.random() < 0.7 else rng.integers(len(KINDS))
            colour, kind = colours[int(c)], KINDS[int(k)]
            layout.append((kind, colour, (row, col), *ShapesWorld._in_cell(rng, row, col)))
        return layout, TEMPLATES[int(rng.integers(len(TEMPLATES)))]

    @staticmethod
    def _in_cell(rng: np.random.Generator, row: int, col: int) -> tuple[tuple[float, float], float]:
        """A random centre (unit coordinates) and side for a shape inside cell (row, col)."""
        size = rng.uniform(0.55, 0.9) / 3  # side, as a fraction of the image
        slack = 1 / 3 - size
        cx = col / 3 + size / 2 + rng.uniform(0, slack)
        cy = row / 3 + size / 2 + rng.uniform(0, slack)
        return (cx, cy), size

    def caption(self, index: int) -> str:
        """The caption of sample `index`, without drawing its image."""
        return self._layout(self.rng(index))[1]

    def sample(self, index: int, image_size: int = 64) -> ShapesSample:
        """Sample `index`: an RGB image of `image_size` pixels, its caption and its shapes."""
        _check_image_size(image_size)
        return self._draw(self.rng(index), image_size)

    def _draw(self, rng: np.random.Generator, image_size: int) -> ShapesSample:
        """Draw a sample from `rng`: the layout and caption first, then the pixels."""
        return self._render(self._scene(rng, image_size), image_size)

    def _scene(self, rng: np.random.Generator, image_size: int) -> _Scene:
        """A sample's scene from `rng`: layout and caption opening, background, shape colours."""
        layout, template = self._place(rng)
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        canvas = self._background(rng, BACKGROUNDS[background], texture, image_size)
        fills = tuple(jittered(colour, rng) for _, colour, *_ in layout)
        return _Scene(tuple(layout), fills, template, background, texture, canvas)

    @staticmethod
    def _render(scene: _Scene, image_size: int) -> ShapesSample:
        """The image, caption and shapes of a scene."""
        image = scene.canvas.copy()
        draw = ImageDraw.Draw(image)
        shapes = []
        for (kind, colour, cell, centre, size), fill in zip(scene.layout, scene.fills):
            box = pixel_box(centre, size, image_size)
            draw_shape(draw, kind, box, fill)
            shapes.append(Shape(kind, colour, box, POSITIONS[cell]))
        return ShapesSample(image, caption_text(shapes, scene.template), tuple(shapes),
                            scene.background, scene.texture)

    def stream_rng(self, stream: int, index: int, *more: int) -> np.random.Generator:
        """The generator of item `index` of a sample type other than plain images.

        Each type has its own stream number, so video 5 and document 5 are independent of each
        other and of `sample(5)`."""
        if index < 0:
            raise ValueError(f"ShapesWorld sample index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, index, stream, *more])

    def video(self, index: int, image_size: int = 64, n_frames: int = 16) -> ShapesVideo:
        """Video `index`: one shape that moves from one side to the opposite one, or grows
        bigger and then smaller in place, on a plain background; the caption says which,
        e.g. "a red circle moves from the left to the right." (the phrasings the tokenizer
        corpus has)."""
        _check_image_size(image_size)
        if n_frames < 2:
            raise ValueError(f"a shapes-world video needs at least 2 frames, got {n_frames}")
        rng = self.stream_rng(STREAM_VIDEO, index)
        colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(KINDS))
        background = BACKGROUNDS[list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]]
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        size = rng.uniform(0.22, 0.3)  # side as a fraction of the frame
        # Where the shape sits on the axis it does not move along (both axes when it grows).
        fixed = rng.uniform(0.35, 0.65, size=2)
        fill = jittered(colour, rng)
        frames = []
        for t in np.linspace(0.0, 1.0, n_frames):
            side, (cx, cy) = size, fixed
            if motion is None:  # grows to 1.8x its size half way, then shrinks back
                side = size * (1 + 0.8 * np.sin(np.pi * t))
            else:
                near, far = size / 2 + 0.02, 1 - size / 2 - 0.02
                start, end = (near, far) if motion[0] in ("left", "top") else (far, near)
                along = start + (end - start) * t
                cx, cy = (along, fixed[1]) if motion[0] in ("left", "right") else (fixed[0], along)
            box = pixel_box((cx, cy), side, image_size)
            frame = Image.new("RGB", (image_size, image_size), background)
            draw_shape(ImageDraw.Draw(frame), kind, box, fill)
            frames.append(frame)
        what = noun_phrase(colour, kind, 1)
        if motion is None:
            caption = f"{what} grows bigger and then smaller."
        else:
            caption = f"{what} moves from the {motion[0]} to the {motion[1]}."
        return ShapesVideo(tuple(frames), caption)

    def grounded(self, index: int, image_size: int = 64) -> ShapesGrounded:
        """Grounded sample `index`: an image and caption as `sample` draws them (from the
        grounding stream), with each noun phrase of the caption tied to its shapes' boxes."""
        _check_image_size(image_size)
        sample = self._draw(self.stream_rng(STREAM_GROUNDED, index), image_size)
        return ShapesGrounded(sample, grounded_phrases(sample))

    def vqa(self, index: int, image_size: int = 64) -> ShapesVQA:
        """VQA item `index`: an image, one question about it (counting, colour, shape,
        position or presence) and ten answers that vary in phrasing as annotators' do
        ("two", "2"; "on the left", "left")."""
        _check_image_size(image_size)
        rng = self.stream_rng(STREAM_VQA, index)
        sample = self._draw(rng, image_size)
        qa = questions(sample.shapes, rng)
        question, answer = qa[int(rng.integers(len(qa)))]
        return ShapesVQA(sample, question, answer, vqa_answers(answer, rng))

    def chat(self, index: int, image_size: int = 64) -> ShapesChat:
        """Chat item `index`: an image and 1 to MAX_CHAT_TURNS turns about it. The first asks
        for a description (one of DESCRIPTION_REQUESTS) and is answered with the caption;
        each later one is a different question of `questions` with its answer."""
        _check_image_size(image_size)
        rng = self.stream_rng(STREAM_CHAT, index)
        sample = self._draw(rng, image_size)
        n_turns = int(rng.integers(1, MAX_CHAT_TURNS + 1))
        turns = [(DESCRIPTION_REQUESTS[int(rng.integers(len(DESCRIPTION_REQUESTS)))], sample.caption)]
        qa = questions(sample.shapes, rng)
        turns += [qa[int(j)] for j in rng.choice(len(qa), size=n_turns - 1, replace=False)]
        return ShapesChat(sample, tuple(turns))

    def edit(self, index: int, image_size: int = 64) -> ShapesEdit:
        """Edit item `index`: an image as `sample` draws it (from the edit stream), one edit of
        EDIT_OPERATIONS and the image after it: recolour a shape ("make the red circle blue.",
        or RECOLOUR_PHRASINGS' other), remove one when there are two or more ("remove the
        green square."), move one to a free cell, keeping its size and its place within the
        cell ("move the yellow triangle to the top right."), or add one in a free cell when
        there are fewer than MAX_SHAPES ("add an orange circle on the left."). A shape that
        shares its colour and kind with another is named with its position too
        (`shape_reference`), so every instruction picks out one shape."""
        _check_image_size(image_size)
        rng = self.stream_rng(STREAM_EDIT, index)
        scene = self._scene(rng, image_size)
        layout, fills = list(scene.layout), list(scene.fills)
        taken = {cell for _, _, cell, *_ in layout}
        free = [cell for cell in POSITIONS if cell not in taken]
        operations = [op for op in EDIT_OPERATIONS
                      if (op != "remove" or len(layout) > 1) and (op != "add" or len(layout) < MAX_SHAPES)]
        operation = operations[int(rng.integers(len(operations)))]
        if operation == "add":
            kind, colour = KINDS[int(rng.integers(len(KINDS)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
            cell = free[int(rng.integers(len(free)))]
            layout.append((kind, colour, cell, *self._in_cell(rng, *cell)))
            fills.append(jittered(colour, rng))
            instruction = f"add {noun_phrase(colour, kind, 1)} {position_phrase(POSITIONS[cell])}."
        else:
            target = int(rng.integers(len(layout)))
            name = shape_reference(layout, target)
            kind, colour, cell, (cx, cy), size = layout[target]
            if operation == "recolour":
                new = [c for c in COLOURS if c != colour][int(rng.integers(len(COLOURS) - 1))]
                layout[target] = (kind, new, cell, (cx, cy), size)
                fills[target] = jittered(new, rng)
                phrasing = RECOLOUR_PHRASINGS[int(rng.integers(len(RECOLOUR_PHRASINGS)))]
                instruction = phrasing.format(t=name, c=new)
            elif operation == "remove":
                del layout[target], fills[target]
                instruction = f"remove {name}."
            else:  # move: the same offset within the new cell
                to = free[int(rng.integers(len(free)))]
                centre = (cx + (to[1] - cell[1]) / 3, cy + (to[0] - cell[0]) / 3)
                layout[target] = (kind, colour, to, centre, size)
                instruction = f"move {name} to the {POSITIONS[to]}."
        edited = self._render(replace(scene, layout=tuple(layout), fills=tuple(fills)), image_size)
        return ShapesEdit(self._render(scene, image_size), instruction, edited, operation)

    def document(self, index: int, image_size: int = 64) -> ShapesDocument:
        """Interleaved document `index`: an opening sentence, then 2 or 3 images each
        followed by its caption, then a sentence counting the shapes of all the images (so
        the last sentence needs every image)."""
        _check_image_size(image_size)
        rng = self.stream_rng(STREAM_DOCUMENT, index)
        n_images = int(rng.integers(2, MAX_DOCUMENT_IMAGES + 1))
        items: list[str | ShapesSample] = [DOCUMENT_OPENINGS[int(rng.integers(len(DOCUMENT_OPENINGS)))]]
        total = 0
        for j in range(n_images):
            sample = self._draw(self.stream_rng(STREAM_DOCUMENT, index, j), image_size)
            items += [sample, sample.caption]
            total += len(sample.shapes)
        items.append(f"in all there are {NUMBERS[total]} shapes.")
        return ShapesDocument(tuple(items))

    def paragraph(self, index: int) -> str:
        """Language-only text `index`: 3 to 6 sentences of shapes-world captions and
        question-answer pairs, no image."""
        rng = self.stream_rng(STREAM_TEXT, index)
        sentences = []
        for _ in range(int(rng.integers(3, 7))):
            layout, caption = self._layout(rng)
            if rng.random() < 0.5:
                sentences.append(caption)
            else:
                q, a = questions(_unit_shapes(layout), rng)[int(rng.integers(7))]
                sentences.append(f"{q} {a}.")
        return " ".join(sentences)

    @staticmethod
    def _background(rng: np.random.Generator, rgb: tuple[int, int, int], texture: str,
                    size: int) -> Image.Image:
        if texture == "plain":
            return Image.new("RGB", (size, size), rgb)
        base = np.array(rgb, dtype=np.int16)
        if texture == "noise":
            pixels = base + rng.integers(-10, 11, size=(size, size, 1), dtype=np.int16)
        else:  # a light linear gradient in a random direction
            angle = rng.uniform(0, 2 * np.pi)
            ramp = np.linspace(-1, 1, size, dtype=np.float32)
            shade = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
            pixels = base + (12 * shade[:, :, None]).astype(np.int16)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def tokenizer_corpus(seed: int = 0, n_samples: int = 20000) -> list[str]:
    """Text to train the shapes-world tokenizer on: captions, questions with answers, and
    the prompt and chat phrasings the engine writes around them (few-shot evaluation, chat
    template, moving-shape video captions)."""
    world = ShapesWorld(seed)
    rng = np.random.default_rng([seed, 1 << 30])
    lines = []
    for index in range(n_samples):
        layout, caption = world._layout(world.rng(index))
        lines.append(caption)
        for q, a in questions(_unit_shapes(layout), rng)[:: 1 + index % 3]:
            style = index % 4
            if style == 0:
                lines.append(f"{q} {a}.")
            elif style == 1:
                lines.append(f"based on the picture, {q} short answer: {a}")
            elif style == 2:
                lines.append(f"based on the picture, answer in one word or phrase. {q} short answer: {a}")
            else:
                lines.append(f"question: {q} answer: {a}.")
    for colour in COLOURS:
        for kind in KINDS:
            for a, b in (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")):
                lines.append(f"{noun_phrase(colour, kind, 1)} moves from the {a} to the {b}.")
            lines.append(f"{noun_phrase(colour, kind, 1)} grows bigger and then smaller.")
            lines.append(f"the {colour} {kind} stays still while the others move.")
    lines += [
        "You are a helpful assistant, dedicated to provide concise and efficient answers.",
        "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses.",
        "describe the image in detail.", "describe this picture.", "what do you see?",
        "draw a picture of the shapes.", "generate an image of the following description.",
        "make the circle red.", "change the colour of the square to blue.",
        "remove the triangle.", "add a green circle at the top left.",
        "a video of shapes moving.", "count the shapes in the picture.",
        # every ASCII letter, so ordinary text needs few byte pieces
        "the quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    ]
    lines += [f"{i} {w}" for i, w in enumerate(NUMBERS)]
    return lines


def _benchmark(image_size: int, n: int) -> float:
    world = ShapesWorld(0)
    start = time.perf_counter()
    for i in range(n):
        world.sample(i, image_size)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description="Show shapes-world samples and measure speed.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=2000, help="images per speed measurement")
    args = parser.parse_args()
    world = ShapesWorld(args.seed)
    for i in range(5):
        print(f"{i}: {world.sample(i).caption}")
    for size in (64, 448):
        n = args.n if size == 64 else max(1, args.n // 10)
        print(f"{size} px: {_benchmark(size, n):.0f} images/s on one core")


if __name__ == "__main__":
    main()
