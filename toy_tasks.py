"""A synthetic multimodal instruction suite, drawn with pillow: nothing is downloaded.

It mirrors the mix of the paper's evaluation (Table 1) at toy scale. Each task asks for a
different visual skill on a 32x32 image:

    colour    what colour is the shape?            (attribute)
    shape     what shape is this?                  (attribute)
    size      is the shape big or small?           (attribute)
    count     how many shapes are there?           (counting)
    presence  is there a red circle?               (POPE: object presence, yes/no)
    spatial   is the red circle left of the ...?   (VSR: spatial relation, yes/no)
    read      what number is written?              (MNIST / Text-VQA: reading a digit)
    classify  what is in the picture?              (CIFAR: six drawn object classes)

Every task has five instruction templates for training and two held out for evaluation
(unseen phrasings, all in a "tell me ... / does ... ?" style the training never shows), and
one task is held out entirely: digit_colour asks the colour of a written digit, combining
the colour skill with the read task's images. Stage 1 ("feature alignment", as in LLaVA)
trains on captions that describe the whole image of any task.

Everything is a pure function of a random.Random, so a seed fixes every image and text.
Texts are lower case with punctuation as separate words, for the word-level tokenizer.
"""

import functools
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 32
_SUPER = 4  # draw at 4x and downsample: anti-aliased shapes at 32x32

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
           "yellow": (235, 200, 20), "purple": (150, 50, 190), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle", "diamond"]
CLASSES = ["house", "tree", "sun", "car", "boat", "flower"]
RELATIONS = ["left of", "right of", "above", "below"]


@dataclass(frozen=True)
class Example:
    task: str
    image: np.ndarray  # (32, 32, 3) uint8
    prompt: str
    answer: str


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    big: bool
    x: float  # centre, in pixels of the 32x32 image
    y: float


# ---- drawing ----------------------------------------------------------------------------------

def _canvas(rng: random.Random) -> Image.Image:
    grey = rng.randint(215, 250)
    return Image.new("RGB", (IMAGE_SIZE * _SUPER,) * 2, (grey, grey, rng.randint(grey - 15, grey)))


def _finish(img: Image.Image, rng: random.Random) -> np.ndarray:
    small = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-8, 9, small.shape, dtype=np.int16)
    return np.clip(small + noise, 0, 255).astype(np.uint8)


def _radius(o: _Object) -> float:
    return 7.0 if o.big else 4.5


def _draw_object(draw: ImageDraw.ImageDraw, o: _Object) -> None:
    s, r = _SUPER, _radius(o) * _SUPER
    x, y, fill = o.x * s, o.y * s, COLOURS[o.colour]
    if o.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "square":
        q = r * 0.85
        draw.rectangle([x - q, y - q, x + q, y + q], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def _place(rng: random.Random, kinds: list[tuple[str, str, bool]]) -> list[_Object]:
    """Non-overlapping objects at random places (rejection sampling)."""
    while True:
        objects = []
        for shape, colour, big in kinds:
            r = 7.0 if big else 4.5
            objects.append(_Object(shape, colour, big, rng.uniform(r + 1, IMAGE_SIZE - r - 1),
                                   rng.uniform(r + 1, IMAGE_SIZE - r - 1)))
        if all(abs(a.x - b.x) > _radius(a) + _radius(b) + 1 or abs(a.y - b.y) > _radius(a) + _radius(b) + 1
               for i, a in enumerate(objects) for b in objects[i + 1:]):
            return objects


def _scene(rng: random.Random, objects: list[_Object]) -> tuple[np.ndarray, str]:
    img = _canvas(rng)
    draw = ImageDraw.Draw(img)
    for o in objects:
        _draw_object(draw, o)
    words = [f"{'big' if o.big else 'small'} {o.colour} {o.shape}" for o in sorted(objects, key=lambda o: o.x)]
    return _finish(img, rng), "a " + " and a ".join(words)


def _random_kind(rng: random.Random, big: bool | None = None) -> tuple[str, str, bool]:
    return rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.random() < 0.5 if big is None else big


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _digit(rng: random.Random) -> tuple[np.ndarray, str, str, str]:
    digit, colour = str(rng.randrange(10)), rng.choice(list(COLOURS))
    img = _canvas(rng)
    font = _font(rng.randint(22, 28) * _SUPER)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
    room_x, room_y = IMAGE_SIZE * _SUPER - (right - left), IMAGE_SIZE * _SUPER - (bottom - top)
    draw.text((rng.uniform(0, room_x) - left, rng.uniform(0, room_y) - top), digit, fill=COLOURS[colour], font=font)
    return _finish(img, rng), f"the number {digit} in {colour}", digit, colour


def _pictogram(rng: random.Random) -> tuple[np.ndarray, str, str]:
    """One of six object classes, drawn from simple parts with random colour, place and scale."""
    cls, colour = rng.choice(CLASSES), rng.choice(list(COLOURS))
    img = _canvas(rng)
    d, fill = ImageDraw.Draw(img), COLOURS[colour]
    k = rng.uniform(0.75, 1.0) * _SUPER  # scale of a 32-unit drawing
    ox, oy = rng.uniform(0, (1 - k / _SUPER) * IMAGE_SIZE) * _SUPER, rng.uniform(0, (1 - k / _SUPER) * IMAGE_SIZE) * _SUPER

    def p(x: float, y: float) -> tuple[float, float]:  # from 32-unit drawing coordinates to pixels
        return ox + x * k, oy + y * k

    dark = (60, 40, 30)
    if cls == "house":
        d.rectangle([p(7, 15), p(25, 29)], fill=fill)
        d.polygon([p(4, 16), p(16, 4), p(28, 16)], fill=dark)
    elif cls == "tree":
        d.rectangle([p(14, 18), p(18, 30)], fill=dark)
        d.ellipse([p(6, 2), p(26, 22)], fill=fill)
    elif cls == "sun":
        for dx, dy in [(0, -13), (0, 13), (-13, 0), (13, 0), (9, 9), (-9, -9), (9, -9), (-9, 9)]:
            d.line([p(16, 16), p(16 + dx, 16 + dy)], fill=fill, width=int(2 * k))
        d.ellipse([p(9, 9), p(23, 23)], fill=fill)
    elif cls == "car":
        d.rectangle([p(3, 14), p(29, 23)], fill=fill)
        d.rectangle([p(9, 8), p(22, 15)], fill=fill)
        d.ellipse([p(6, 20), p(12, 26)], fill=dark)
        d.ellipse([p(20, 20), p(26, 26)], fill=dark)
    elif cls == "boat":
        d.polygon([p(3, 21), p(29, 21), p(24, 28), p(8, 28)], fill=dark)
        d.line([p(16, 3), p(16, 21)], fill=dark, width=int(1.5 * k))
        d.polygon([p(17, 4), p(27, 19), p(17, 19)], fill=fill)
    else:  # flower
        d.line([p(16, 16), p(16, 30)], fill=(30, 140, 40), width=int(2 * k))
        for dx, dy in [(0, -6), (0, 6), (-6, 0), (6, 0)]:
            d.ellipse([p(12 + dx, 8 + dy), p(20 + dx, 16 + dy)], fill=fill)
        d.ellipse([p(13, 9), p(19, 15)], fill=(250, 230, 120))
    return _finish(img, rng), f"a {colour} {cls}", cls


# ---- the tasks --------------------------------------------------------------------------------
# A task draws (image, caption, template slots, answer) from a random.Random.

Draw = tuple[np.ndarray, str, dict[str, str], str]


def _one_object(rng: random.Random) -> tuple[_Object, np.ndarray, str]:
    (o,) = _place(rng, [_random_kind(rng)])
    image, caption = _scene(rng, [o])
    return o, image, caption


def _colour(rng: random.Random) -> Draw:
    o, image, caption = _one_object(rng)
    return image, caption, {}, o.colour


def _shape(rng: random.Random) -> Draw:
    o, image, caption = _one_object(rng)
    return image, caption, {}, o.shape


def _size(rng: random.Random) -> Draw:
    o, image, caption = _one_object(rng)
    return image, caption, {}, "big" if o.big else "small"


def _count(rng: random.Random) -> Draw:
    objects = _place(rng, [_random_kind(rng, big=False) for _ in range(rng.randint(1, 4))])
    image, caption = _scene(rng, objects)
    return image, caption, {}, str(len(objects))


def _presence(rng: random.Random) -> Draw:
    """POPE-style: half the questions name an object that is there, half a near miss that is not."""
    kinds = [_random_kind(rng)] + [_random_kind(rng, big=False) for _ in range(rng.randint(0, 2))]
    objects = _place(rng, kinds)
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        asked, answer = rng.choice(sorted(present)), "yes"
    else:  # share the colour or the shape with an object in the image
        colour, shape = rng.choice(sorted(present))
        misses = [(c, shape) for c in COLOURS] + [(colour, s) for s in SHAPES]
        asked, answer = rng.choice([m for m in misses if m not in present]), "no"
    image, caption = _scene(rng, objects)
    return image, caption, {"c": asked[0], "s": asked[1]}, answer


def _spatial(rng: random.Random) -> Draw:
    """VSR-style: two distinct objects, clearly apart along the axis the relation is about."""
    relation = rng.choice(RELATIONS)
    while True:
        kinds = [_random_kind(rng), _random_kind(rng)]
        a, b = _place(rng, kinds)
        gap = (b.x - a.x) if relation in ("left of", "right of") else (b.y - a.y)
        if kinds[0][:2] != kinds[1][:2] and abs(gap) > 6:
            break
    truth = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]
    image, caption = _scene(rng, [a, b])
    slots = {"c1": a.colour, "s1": a.shape, "rel": relation, "c2": b.colour, "s2": b.shape}
    return image, caption, slots, "yes" if truth else "no"


def _read(rng: random.Random) -> Draw:
    image, caption, digit, _ = _digit(rng)
    return image, caption, {}, digit


def _digit_colour(rng: random.Random) -> Draw:
    image, caption, _, colour = _digit(rng)
    return image, caption, {}, colour


def _classify(rng: random.Random) -> Draw:
    image, caption, cls = _pictogram(rng)
    return image, caption, {}, cls


@dataclass(frozen=True)
class Task:
    name: str
    draw: Callable[[random.Random], Draw]
    templates: tuple[str, ...]  # for training
    heldout_templates: tuple[str, ...]  # for evaluation only: unseen phrasings


TASKS = {t.name: t for t in [
    Task("colour", _colour,
         ("what colour is the shape ?", "what is the colour of the object ?", "name the colour of the shape .",
          "which colour is shown ?", "the shape has which colour ?"),
         ("tell me the colour of this object .", "what colour does the object have ?")),
    Task("shape", _shape,
         ("what shape is this ?", "what is the shape of the object ?", "name the shape .",
          "which shape is shown ?", "the object is which shape ?"),
         ("tell me the shape of this object .", "what kind of shape does the image show ?")),
    Task("size", _size,
         ("is the shape big or small ?", "is the object small or big ?", "how big is the shape ?",
          "what size is the object ?", "is this shape big or is it small ?"),
         ("tell me the size of this object .", "does the object look big or small ?")),
    Task("count", _count,
         ("how many shapes are there ?", "how many objects are in the image ?", "count the shapes .",
          "what is the number of objects ?", "count the objects in the image ."),
         ("tell me how many shapes you see .", "how many objects does the image show ?")),
    Task("presence", _presence,
         ("is there a {c} {s} ?", "is there a {c} {s} in the image ?", "does the image contain a {c} {s} ?",
          "can you see a {c} {s} ?", "is a {c} {s} present ?"),
         ("tell me if there is a {c} {s} .", "does a {c} {s} appear in the image ?")),
    Task("spatial", _spatial,
         ("is the {c1} {s1} {rel} the {c2} {s2} ?", "is the {c1} {s1} placed {rel} the {c2} {s2} ?",
          "the {c1} {s1} is {rel} the {c2} {s2} , yes or no ?", "is it true that the {c1} {s1} is {rel} the {c2} {s2} ?",
          "{rel} the {c2} {s2} , is there the {c1} {s1} ?"),
         ("tell me if the {c1} {s1} is {rel} the {c2} {s2} .", "does the {c1} {s1} appear {rel} the {c2} {s2} ?")),
    Task("read", _read,
         ("what number is written ?", "what digit is shown ?", "read the number in the image .",
          "which digit is this ?", "what number do you see ?"),
         ("tell me the number in this image .", "what digit does the image show ?")),
    Task("classify", _classify,
         ("what is in the picture ?", "what object is shown ?", "name the object in the image .",
          "what is this ?", "which object is this ?"),
         ("tell me what this picture shows .", "what kind of object does the image show ?")),
]}

# Held out entirely: no template of it is trained on. It pairs the colour skill with digit images.
HELDOUT_TASKS = {"digit_colour": Task("digit_colour", _digit_colour, (),
                                      ("what colour is the number ?", "tell me the colour of the digit ."))}
CAPTION_PROMPTS = ("describe the image .", "what does the image show ? describe it .")
# Our LM, unlike LLaVA's, has no language pretraining: a word it never has to say in stage 1
# keeps an untrained output embedding, and a frozen base can then never say it confidently.
# So one alignment prompt is answered with "yes" or "no" first (is any geometric shape drawn,
# or a digit or an object class?), which puts yes and no in the base's vocabulary.
SHAPE_PROMPT = "is there a shape in the image ?"


# ---- the conflict knob ---------------------------------------------------------------------------
# K tasks ask the same question of the same kind of image (the colour of one shape), each behind
# its own instruction word, and answer with a colour word through their own mapping. κ sets how
# much the mappings disagree: the first round(6κ) colours are remapped, task k answering colour
# c with the colour k places further round the list, and the rest keep their own name. So two
# tasks give different answers to the same image on a fraction κ of the images (K ≤ 6): κ = 0 is
# one task under K names, κ = 1 gives every task its own answer to every image. The same inputs
# then need different updates, and only the instruction word says which: conflict as in the
# paper, readable from the prompt. Every word is in the suite's vocabulary (the instruction
# words are the object classes; the answers are colour names, which stage 1's captions train).

CONFLICT_WORDS = CLASSES  # the K instruction words


def conflict_tasks(num_tasks: int, conflict: float) -> dict[str, Task]:
    """The K = num_tasks tasks of the conflict knob at κ = conflict, keyed by instruction word."""
    colours = list(COLOURS)
    if not 1 <= num_tasks <= len(CONFLICT_WORDS):
        raise ValueError(f"num_tasks must be in 1 ... {len(CONFLICT_WORDS)}, got {num_tasks}")
    if abs(conflict * len(colours) - round(conflict * len(colours))) > 1e-9 or not 0 <= conflict <= 1:
        raise ValueError(f"conflict must be a multiple of 1/{len(colours)} in [0, 1] (a share of the "
                         f"{len(colours)} colours), got {conflict}")
    remapped = colours[:round(conflict * len(colours))]

    def make(k: int, word: str) -> Task:
        def draw(rng: random.Random) -> Draw:
            o, image, caption = _one_object(rng)
            answer = colours[(colours.index(o.colour) + k) % len(colours)] if o.colour in remapped else o.colour
            return image, caption, {"w": word}, answer

        colour = TASKS["colour"]
        return Task(word, draw, tuple("{w} , " + t for t in colour.templates),
                    tuple("{w} , " + t for t in colour.heldout_templates))

    return {word: make(k, word) for k, word in enumerate(CONFLICT_WORDS[:num_tasks])}


def sample(task: Task, rng: random.Random, heldout: bool = False) -> Example:
    """One instruction example of task; heldout picks an unseen phrasing."""
    image, _, slots, answer = task.draw(rng)
    template = rng.choice(task.heldout_templates if heldout else task.templates)
    return Example(task.name, image, template.format(**slots), answer)


def samples(task: Task, n: int, key: str, heldout: bool = False) -> list[Example]:
    """n examples of task, example i drawn from random.Random(f"{key}-{i}"): a fixed set that any
    run can rebuild from its key, and that never meets a set of another key."""
    return [sample(task, random.Random(f"{key}-{i}"), heldout) for i in range(n)]


def sample_caption(rng: random.Random) -> Example:
    """Stage-1 alignment: the image of any task (held-out ones too), described whole."""
    task = rng.choice(list(TASKS.values()) + list(HELDOUT_TASKS.values()))
    image, caption, _, _ = task.draw(rng)
    if rng.random() < 1 / 3:
        has_shape = any(shape in caption.split() for shape in SHAPES)
        return Example("caption", image, SHAPE_PROMPT, ("yes , " if has_shape else "no , ") + caption)
    return Example("caption", image, rng.choice(CAPTION_PROMPTS), caption)


def vocabulary() -> list[str]:
    """Every word the suite can produce, for the word-level tokenizer."""
    texts = list(CAPTION_PROMPTS) + [SHAPE_PROMPT, "a and the number in big small", *COLOURS, *SHAPES, *CLASSES, *RELATIONS]
    texts += [str(d) for d in range(10)] + ["yes", "no"]
    for task in [*TASKS.values(), *HELDOUT_TASKS.values()]:
        texts += [t.format(c="", s="", c1="", s1="", c2="", s2="", rel="") for t in task.templates + task.heldout_templates]
    return sorted({w for text in texts for w in text.split()})
