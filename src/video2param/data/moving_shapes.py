"""MovingShapes: a synthetic video question-answering benchmark that trains on a CPU in minutes.

Each video shows 1..``max_objects`` coloured shapes on a plain black background, each moving in a straight line
(left, right, up or down) during its own window of visible frames. Every question has a one-word answer:

* ``color`` (static): ``what colour is the <shape>?`` (or ``what colour is the object?`` when alone) → a colour
* ``shape`` (static): ``what shape is the <colour> object?`` → a shape
* ``direction`` (temporal): ``which way does the <colour> <shape> move?`` → left / right / up / down
* ``order`` (temporal): ``which colour appears first?`` / ``which shape appears first?`` → a colour / a shape
* ``count`` (temporal): ``how many objects are there?`` → a number word (one, two, ...)

Types listed in ``single_object_types`` are asked only about videos with one object, visible in every frame, and
name none (``what shape is the object?``, ``which way does the object move?``): they test seeing and motion
without binding a name to one of several objects or finding when it is on screen, which a small LM trained from
scratch learns far more slowly (docs/results.md).

Design choices that keep the benchmark honest:

* Every answer is visible in the pixels: objects in one video have distinct colours *and* distinct shapes, their
  boxes never touch while both are visible (no occlusion), each moves at least ``frame_size // 4`` pixels over its
  window, and appearances are staggered by at least ``order_gap`` frames.
* Temporal questions need frame *order*, not just the set of frames: all objects of a video stay visible for the
  same number of frames and the scene distribution is symmetric under time reversal (uniform directions, symmetric
  pixel offsets, exchangeable start gaps). A reversed clip is as likely as the clip itself (up to the split's
  hash partition) and flips the direction and order answers, so a model that ignores frame order is at chance on
  ``order`` and cannot tell left from right (or up from down) on ``direction``.
* Answers are balanced: question types cycle over the indices, and within a type the answers come in seeded
  random permutations of the answer set, so any prefix of the dataset is balanced up to one sample per answer.
* Deterministic by ``seed``; ``train`` and ``test`` draw from different seed streams *and* each accepts only
  scenes whose content hash falls in its half, so the two splits never share a (video, question) pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

QUESTION_CATEGORY: dict[str, str] = {
    "color": "static",
    "shape": "static",
    "direction": "temporal",
    "order": "temporal",
    "count": "temporal",
}
QUESTION_TYPES: tuple[str, ...] = tuple(QUESTION_CATEGORY)

#: RGB (uint8) of every colour the benchmark can draw; a config picks a subset by name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 90, 255),
    "yellow": (240, 225, 30),
    "purple": (160, 60, 220),
    "orange": (255, 140, 0),
    "cyan": (0, 215, 215),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross", "diamond")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
OPPOSITE_DIRECTION: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# (row, col) unit step of each direction; rows grow downwards as in images.
_STEP: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
_SPLIT_ID: dict[str, int] = {"train": 0, "test": 1}
_PLACEMENT_TRIES = 64  # positions tried per object before the whole scene is redrawn
_SCENE_TRIES = 200  # scenes drawn before giving up on a crowded config
_MIN_OBJECT_SIZE = 5  # below this the shapes stop being distinguishable


@dataclass
class MovingShapesConfig:
    """Settings of the MovingShapes generator. A bad value raises ``ValueError`` naming the field."""

    num_frames: int = field(default=8, metadata={"help": "Frames per video."})
    frame_size: int = field(default=32, metadata={"help": "Height and width of each frame in pixels."})
    max_objects: int = field(default=2, metadata={"help": "Largest number of objects in one video."})
    question_types: tuple[str, ...] = field(
        default=QUESTION_TYPES,
        metadata={"help": "Question types, cycled over the indices: color, shape, direction, order, count."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the whole benchmark (non-negative)."})
    min_objects: int = field(default=1, metadata={"help": "Smallest number of objects in one video."})
    object_size: int | None = field(
        default=None, metadata={"help": "Side of an object's bounding box in pixels; None means frame_size // 4."}
    )
    colors: tuple[str, ...] = field(
        default=("red", "green", "blue", "yellow"),
        metadata={"help": f"Colour names to use, a subset of: {', '.join(PALETTE)}."},
    )
    shapes: tuple[str, ...] = field(
        default=("square", "circle", "triangle", "cross"),
        metadata={"help": f"Shape names to use, a subset of: {', '.join(SHAPES)}."},
    )
    order_gap: int = field(
        default=2, metadata={"help": "Objects of one video appear at least this many frames apart."}
    )
    min_visible_frames: int = field(
        default=4, metadata={"help": "Fewest frames an object stays visible (its motion is seen over them)."}
    )
    single_object_types: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Question types asked only about videos with one object, phrased without naming it "
                          "('what colour is the object?') and showing it in every frame: no binding of a name to "
                          "one of several objects, no search for when it is visible. Any of color, shape, "
                          "direction."},
    )

    def __post_init__(self) -> None:
        for name in ("num_frames", "frame_size", "max_objects", "min_objects", "order_gap", "min_visible_frames"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.object_size is None:
            self.object_size = self.frame_size // 4
        _check_int("object_size", self.object_size, minimum=_MIN_OBJECT_SIZE)
        self.question_types = _as_names("question_types", self.question_types, QUESTION_TYPES)
        self.colors = _as_names("colors", self.colors, tuple(PALETTE))
        self.shapes = _as_names("shapes", self.shapes, SHAPES)
        self.single_object_types = (_as_names("single_object_types", self.single_object_types,
                                              ("color", "shape", "direction"))
                                    if self.single_object_types else ())
        if self.single_object_types and self.min_objects > 1:
            raise ValueError(f"single_object_types: needs min_objects <= 1, got {self.min_objects}")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) is larger than max_objects ({self.max_objects})")
        if self.max_objects >= len(NUMBER_WORDS):
            raise ValueError(f"max_objects: at most {len(NUMBER_WORDS) - 1} objects, got {self.max_objects}")
        if self.max_objects > min(len(self.colors), len(self.shapes)):
            raise ValueError(
                f"max_objects ({self.max_objects}) exceeds the number of colours ({len(self.colors)}) or shapes "
                f"({len(self.shapes)}); objects of one video need distinct colours and shapes"
            )
        if "order" in self.question_types and self.max_objects < 2:
            raise ValueError("question_types: 'order' needs max_objects >= 2")
        if self.min_visible_frames < 2:
            raise ValueError("min_visible_frames: motion needs at least 2 visible frames")
        span = (self.max_objects - 1) * self.order_gap + self.min_visible_frames
        if span > self.num_frames:
            raise ValueError(
                f"num_frames ({self.num_frames}) is too short: {self.max_objects} objects appearing {self.order_gap} "
                f"frames apart and visible for {self.min_visible_frames} frames need {span} frames"
            )
        if self.object_size > self.frame_size - self.min_displacement:
            raise ValueError(
                f"object_size ({self.object_size}) leaves no room to move {self.min_displacement} pixels in a "
                f"{self.frame_size}-pixel frame; use a smaller object_size or a larger frame_size"
            )

    @property
    def min_displacement(self) -> int:
        """Fewest pixels an object travels over its visible frames (its motion must be obvious)."""
        return max(2, self.frame_size // 4)


QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what colour is the {shape}?", "what colour is the object?"),
    "shape": ("what shape is the {color} object?", "what shape is the object?"),
    "direction": ("which way does the {color} {shape} move?", "which way does the object move?"),
    "order": ("which colour appears first?", "which shape appears first?"),
    "count": ("how many objects are there?",),
}


@dataclass(eq=False)  # compared by identity: field-wise == on tensors is ambiguous
class VideoQA:
    """One benchmark sample: a clip and a question about it with a one-word answer."""

    video: torch.Tensor  # float32 (T, 3, H, W) in [0, 1]
    question: str
    answer: str
    qtype: str
    category: str


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: what it is, how it moves and when it is visible."""

    color: str
    shape: str
    direction: str
    first_frame: int
    positions: tuple[tuple[int, int], ...]  # (top, left) of its box, one per visible frame from first_frame on

    @property
    def last_frame(self) -> int:
        """Index of the last frame in which the object is drawn."""
        return self.first_frame + len(self.positions) - 1


@dataclass(frozen=True)
class Scene:
    """Everything that defines a sample; the video is a pure function of (config, objects)."""

    objects: tuple[SceneObject, ...]
    question: str
    answer: str
    qtype: str

    def key(self) -> str:
        """A stable digest of the (video, question) content; used to split train from test."""
        content = repr((self.question, [(o.color, o.shape, o.first_frame, o.positions) for o in self.objects]))
        return hashlib.blake2b(content.encode(), digest_size=16).hexdigest()


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` drawn in a size × size box."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")
    return _shape_mask(shape, size).copy()


@lru_cache(maxsize=None)
def _shape_mask(shape: str, size: int) -> np.ndarray:
    # Pixel centres relative to the box centre; the triangle's half-pixel tolerance keeps its apex from vanishing.
    c = np.arange(size) + 0.5 - size / 2
    dy, dx = c[:, None], c[None, :]
    r = size / 2
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "triangle":  # apex up, base on the bottom row
        mask = np.abs(dx) <= (dy + r) / 2 + 0.5
    elif shape == "cross":
        arm = size / 6
        mask = (np.abs(dx) <= arm) | (np.abs(dy) <= arm)
    else:  # diamond
        mask = np.abs(dx) + np.abs(dy) <= r
    mask.setflags(write=False)
    return mask


def moving_shapes_vocabulary(config: MovingShapesConfig) -> list[str]:
    """Every word (and punctuation token) a question or an answer of ``config`` can contain, sorted."""
    words: set[str] = set()
    for qtype in config.question_types:
        for template in QUESTION_TEMPLATES[qtype]:
            words.update(_words(template.format(color="", shape="")))
        words.update(answer_set(config, qtype))
    if any(q in config.question_types for q in ("color", "direction")):
        words.update(config.shapes)
    if any(q in config.question_types for q in ("shape", "direction")):
        words.update(config.colors)
    return sorted(words)


def answer_set(config: MovingShapesConfig, qtype: str) -> tuple[str, ...]:
    """All answers a question of type ``qtype`` can have under ``config`` (uniformly distributed)."""
    if qtype == "color":
        return config.colors
    if qtype == "shape":
        return config.shapes
    if qtype == "direction":
        return DIRECTIONS
    if qtype == "order":
        return config.colors + config.shapes
    if qtype == "count":
        return NUMBER_WORDS[config.min_objects : config.max_objects + 1]
    raise ValueError(f"unknown question type {qtype!r}; types are {', '.join(QUESTION_TYPES)}")


def chance_accuracy(config: MovingShapesConfig) -> dict[str, float]:
    """Accuracy per question type of the best guess that reads the question but not the video.

    Answers are balanced within a type, so that guess is right once per candidate answer the question leaves open:
    1 / (colours) for ``color``, 1 / (shapes) for ``shape``, 1/4 for ``direction``, 1 / (number of object counts)
    for ``count``; an ``order`` question names what it asks for (a colour or a shape), so 1 / (colours) or
    1 / (shapes), weighted by how often each form is asked. Categories (``static``, ``temporal``) and ``overall`` average their types (types are
    asked equally often).
    """
    chance: dict[str, float] = {}
    for qtype in config.question_types:
        if qtype == "order":
            colors, shapes = len(config.colors), len(config.shapes)
            # Answers cycle over colours + shapes; the question's form says which of the two sets to guess from.
            chance[qtype] = (colors / (colors + shapes)) / colors + (shapes / (colors + shapes)) / shapes
        else:
            chance[qtype] = 1.0 / len(answer_set(config, qtype))
    for group in ("static", "temporal"):
        members = [chance[q] for q in config.question_types if QUESTION_CATEGORY[q] == group]
        if members:
            chance[group] = sum(members) / len(members)
    chance["overall"] = sum(chance[q] for q in config.question_types) / len(config.question_types)
    return chance


def render_scene(config: MovingShapesConfig, scene: Scene) -> np.ndarray:
    """Draw ``scene`` as uint8 frames (T, 3, H, W) on a black background."""
    size = config.object_size
    video = np.zeros((config.num_frames, 3, config.frame_size, config.frame_size), dtype=np.uint8)
    for obj in scene.objects:
        dy, dx = np.nonzero(_shape_mask(obj.shape, size))
        pos = np.asarray(obj.positions)  # (L, 2)
        frames = np.arange(obj.first_frame, obj.last_frame + 1)[:, None]
        # One fancy-index write per object covers all its frames and pixels; the indexed view is (L, P, 3).
        video[frames, :, pos[:, :1] + dy[None], pos[:, 1:] + dx[None]] = PALETTE[obj.color]
    return video


class MovingShapes(Dataset):
    """``size`` MovingShapes samples of one split; items are :class:`VideoQA`. Generated lazily and cached.

    Videos are cached as uint8 (a quarter of the float memory) and converted to float32 in ``__getitem__``.
    """

    def __init__(self, config: MovingShapesConfig, size: int, split: Literal["train", "test"] = "train") -> None:
        if not isinstance(config, MovingShapesConfig):
            raise ValueError(f"config: expected a MovingShapesConfig, got {type(config).__name__}")
        _check_int("size", size, minimum=0)
        if split not in _SPLIT_ID:
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        self.config = dataclasses.replace(config)  # a private copy: later edits of the caller's config can't leak in
        self.size = size
        self.split = split
        self._cache: dict[int, tuple[Scene, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> VideoQA:
        scene, frames = self._get(index)
        return VideoQA(
            video=torch.from_numpy(np.divide(frames, 255.0, dtype=np.float32)),
            question=scene.question,
            answer=scene.answer,
            qtype=scene.qtype,
            category=QUESTION_CATEGORY[scene.qtype],
        )

    def scene(self, index: int) -> Scene:
        """The scene description behind item ``index`` (objects, their motion and visibility)."""
        return self._get(index)[0]

    def vocabulary(self) -> list[str]:
        """Every word any question or answer of this dataset can use."""
        return moving_shapes_vocabulary(self.config)

    def materialize(self) -> MovingShapes:
        """Generate every item now (otherwise items are generated on first access). Returns ``self``."""
        for i in range(self.size):
            self._get(i)
        return self

    def _get(self, index: int) -> tuple[Scene, np.ndarray]:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        index = int(index)
        cached = self._cache.get(index)
        if cached is None:
            scene = self._generate(index)
            cached = self._cache[index] = (scene, render_scene(self.config, scene))
        return cached

    def _generate(self, index: int) -> Scene:
        cfg = self.config
        split_id = _SPLIT_ID[self.split]
        qtype, answer = _planned_answer(cfg, split_id, index)
        rng = random.Random(f"moving-shapes/scene/{cfg.seed}/{split_id}/{index}")  # str seeds hash stably
        # Hash-based acceptance makes the splits disjoint by construction, whatever the seeds.
        for _ in range(_SCENE_TRIES):
            scene = _sample_scene(cfg, rng, qtype, answer)
            if int(scene.key()[:8], 16) % 2 == split_id:
                return scene
        raise RuntimeError(f"no {self.split} scene found for item {index}; the config admits too few scenes")


def make_splits(config: MovingShapesConfig, train_size: int, test_size: int) -> tuple[MovingShapes, MovingShapes]:
    """The train and test splits of ``config``; they never share a (video, question) pair."""
    return MovingShapes(config, train_size, "train"), MovingShapes(config, test_size, "test")


# --- generation ------------------------------------------------------------------------------------------------
# Scenes hold a handful of small numbers, so the sampler uses Python's `random` (cheap scalar draws); only the
# drawing of pixels is vectorised.


def _planned_answer(cfg: MovingShapesConfig, split_id: int, index: int) -> tuple[str, str]:
    """(qtype, answer) of item ``index``: types cycle; answers of a type come in seeded permutations."""
    k = len(cfg.question_types)
    type_index, j = index % k, index // k
    qtype = cfg.question_types[type_index]
    answers = answer_set(cfg, qtype)
    perm = _permutation(cfg.seed, split_id, type_index, j // len(answers), len(answers))
    return qtype, answers[perm[j % len(answers)]]


@lru_cache(maxsize=4096)
def _permutation(seed: int, split_id: int, type_index: int, block: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"moving-shapes/answers/{seed}/{split_id}/{type_index}/{block}").shuffle(order)
    return tuple(order)


def _sample_scene(cfg: MovingShapesConfig, rng: random.Random, qtype: str, answer: str) -> Scene:
    """Draw objects consistent with ``answer`` to a ``qtype`` question, then phrase the question."""
    lowest = max(2, cfg.min_objects) if qtype == "order" else cfg.min_objects
    alone = qtype in cfg.single_object_types  # one object, asked about without naming it
    if alone:
        n = 1
    else:
        n = NUMBER_WORDS.index(answer) if qtype == "count" else rng.randint(lowest, cfg.max_objects)
    # Object 0 is the one the question is about (for "order": the one that appears first).
    fixed_color = answer if qtype == "color" or (qtype == "order" and answer in cfg.colors) else None
    fixed_shape = answer if qtype == "shape" or (qtype == "order" and answer in cfg.shapes) else None
    fixed_direction = answer if qtype == "direction" else None
    colors = _distinct(rng, cfg.colors, n, fixed_color)
    shapes = _distinct(rng, cfg.shapes, n, fixed_shape)
    if alone:  # the lone object is on screen for the whole clip: the question is about seeing and motion only
        first_frames, length = [0], cfg.num_frames
    else:
        first_frames, length = _windows(cfg, rng, n, first_is_zero=qtype == "order")
    for _ in range(_SCENE_TRIES):
        objects = _place(cfg, rng, colors, shapes, first_frames, length, fixed_direction)
        if objects is not None:
            break
    else:
        raise RuntimeError(
            f"could not place {n} objects of size {cfg.object_size} without overlap in a {cfg.frame_size}-pixel "
            "frame; use a larger frame_size, a smaller object_size or fewer objects"
        )
    target = objects[0]
    if qtype == "color":
        use_object = alone or (n == 1 and rng.random() < 0.5)
        question = QUESTION_TEMPLATES["color"][1 if use_object else 0].format(shape=target.shape)
    elif qtype == "shape":
        question = QUESTION_TEMPLATES["shape"][1 if alone else 0].format(color=target.color)
    elif qtype == "direction":
        question = QUESTION_TEMPLATES["direction"][1 if alone else 0].format(color=target.color, shape=target.shape)
    elif qtype == "order":
        question = QUESTION_TEMPLATES["order"][0 if answer in cfg.colors else 1]
    else:
        question = QUESTION_TEMPLATES["count"][0]
    return Scene(objects=tuple(objects), question=question, answer=answer, qtype=qtype)


def _distinct(rng: random.Random, names: tuple[str, ...], n: int, first: str | None) -> list[str]:
    """``n`` distinct names; the first one is ``first`` when given."""
    if first is None:
        return rng.sample(names, n)
    return [first] + rng.sample([name for name in names if name != first], n - 1)


def _windows(cfg: MovingShapesConfig, rng: random.Random, n: int, first_is_zero: bool) -> tuple[list[int], int]:
    """First visible frame of each object and the common visible length.

    All objects share one length so that the *set* of frames says nothing about who came first; the slack is split
    into n + 1 gaps uniformly over all compositions, a distribution that is symmetric under time reversal.
    """
    T, gap = cfg.num_frames, cfg.order_gap
    length = rng.randint(cfg.min_visible_frames, T - (n - 1) * gap)
    slack = T - length - (n - 1) * gap
    bars = sorted(rng.sample(range(slack + n), n))  # stars and bars
    parts = [b - a - 1 for a, b in zip([-1] + bars, bars)]  # the n leading gaps; the rest is the tail
    starts, t = [], 0
    for k, part in enumerate(parts):
        t += part + (gap if k else 0)
        starts.append(t)
    rank = [0] + [1 + r for r in rng.sample(range(n - 1), n - 1)] if first_is_zero else rng.sample(range(n), n)
    return [starts[r] for r in rank], length


def _offsets(distance: int, length: int) -> list[int]:
    """Monotone pixel offsets 0..distance over ``length`` frames, symmetric: off[k] + off[L-1-k] == distance.

    Symmetry (exact when ``length`` is even or ``distance`` is even) makes a clip and its reversal draw the same
    set of positions, so positions alone never give the direction away.
    """
    off = [math.floor(distance * k / (length - 1) + 0.5) for k in range(length)]
    for k in range(length // 2):
        off[length - 1 - k] = distance - off[k]
    return off


def _place(cfg: MovingShapesConfig, rng: random.Random, colors: list[str], shapes: list[str],
           first_frames: list[int], length: int, fixed_direction: str | None) -> list[SceneObject] | None:
    """Draw directions and trajectories; None when an object found no overlap-free trajectory."""
    room = cfg.frame_size - cfg.object_size  # largest top/left coordinate
    objects: list[SceneObject] = []
    for i, (color, shape, first) in enumerate(zip(colors, shapes, first_frames)):
        for _ in range(_PLACEMENT_TRIES):
            direction = fixed_direction if (i == 0 and fixed_direction) else rng.choice(DIRECTIONS)
            distance = rng.randint(cfg.min_displacement, room)
            if length % 2 and distance % 2:  # odd length: an even distance keeps the middle frame symmetric
                distance += 1 if distance < room else -int(distance > cfg.min_displacement)
            lo = rng.randint(0, room - distance)  # the trajectory covers [lo, lo + distance]
            across = rng.randint(0, room)
            d_row, d_col = _STEP[direction]
            sign = d_row + d_col
            along = [lo + o if sign > 0 else lo + distance - o for o in _offsets(distance, length)]
            positions = tuple((a, across) if d_row else (across, a) for a in along)
            candidate = SceneObject(color, shape, direction, first, positions)
            if not any(_collide(candidate, other, cfg.object_size) for other in objects):
                objects.append(candidate)
                break
        else:
            return None
    return objects


def _collide(a: SceneObject, b: SceneObject, size: int) -> bool:
    """Whether two boxes come closer than one pixel in a frame where both are visible."""
    for t in range(max(a.first_frame, b.first_frame), min(a.last_frame, b.last_frame) + 1):
        (ra, ca), (rb, cb) = a.positions[t - a.first_frame], b.positions[t - b.first_frame]
        if abs(ra - rb) <= size and abs(ca - cb) <= size:
            return True
    return False


# --- helpers -------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Split like the word tokenizer's pre-tokenizer: runs of word characters, runs of punctuation."""
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")


def _as_names(name: str, value: object, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}: expected a non-empty list of names, got {value!r}")
    names = tuple(value)
    for item in names:
        if item not in allowed:
            raise ValueError(f"{name}: unknown name {item!r}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: duplicate name in {names}")
    return names
