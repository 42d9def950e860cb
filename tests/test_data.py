"""video2param.data: the MovingShapes benchmark, the word tokenizer, the collator and `evaluate`."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from video2param.data import (
    IGNORE_INDEX,
    QUESTION_CATEGORY,
    MovingShapes,
    MovingShapesConfig,
    VideoQA,
    VideoQACollator,
    build_word_tokenizer,
    chance_accuracy,
    evaluate,
    format_prompt,
    make_splits,
    moving_shapes_tokenizer,
    moving_shapes_vocabulary,
)
from video2param.data.moving_shapes import (
    DIRECTIONS,
    NUMBER_WORDS,
    OPPOSITE_DIRECTION,
    PALETTE,
    SHAPES,
    answer_set,
    shape_mask,
)

VIDEO = "<video>"


@pytest.fixture(scope="module")
def config() -> MovingShapesConfig:
    return MovingShapesConfig()


@pytest.fixture(scope="module")
def dataset(config) -> MovingShapes:
    return MovingShapes(config, 400, "train").materialize()


@pytest.fixture()
def tok(config):
    tokenizer = moving_shapes_tokenizer(config)
    tokenizer.add_tokens([VIDEO], special_tokens=True)
    return tokenizer


def tiny_config(**overrides) -> MovingShapesConfig:
    """A config with so few possible scenes that independent draws collide often."""
    base = dict(num_frames=3, frame_size=12, object_size=5, max_objects=1, colors=("red", "green"),
                shapes=("square", "circle"), min_visible_frames=2, question_types=("color", "shape", "direction"))
    return MovingShapesConfig(**{**base, **overrides})


# --- a reader that answers every question from the pixels alone -------------------------------------------------


def read_objects(video: torch.Tensor, config: MovingShapesConfig) -> dict[str, dict]:
    """colour -> {shape, frames (visible, in order), centroids (row, col) per visible frame}, from the pixels only."""
    pixels = np.rint(video.permute(0, 2, 3, 1).numpy() * 255).astype(np.int64)  # (T, H, W, 3)
    assert ((pixels == 0).all(-1) | np.isin(pixels, [c for rgb in PALETTE.values() for c in rgb]).all(-1)).all()
    size = config.object_size
    found = {}
    for color, rgb in PALETTE.items():
        mask = (pixels == np.array(rgb)).all(-1)  # (T, H, W)
        frames = [t for t in range(mask.shape[0]) if mask[t].any()]
        if not frames:
            continue
        shapes = set()
        centroids = []
        for t in frames:
            rows, cols = np.nonzero(mask[t])
            crop = mask[t, rows.min() : rows.min() + size, cols.min() : cols.min() + size]
            # The whole blob must be one shape mask, unoccluded (no other colour drawn on it).
            matches = [s for s in SHAPES if crop.shape == (size, size) and (crop == shape_mask(s, size)).all()
                       and mask[t].sum() == shape_mask(s, size).sum()]
            assert len(matches) == 1, f"{color} blob in frame {t} is not exactly one shape"
            shapes.add(matches[0])
            centroids.append((rows.mean(), cols.mean()))
        assert len(shapes) == 1, f"{color} changes shape over time"
        found[color] = {"shape": shapes.pop(), "frames": frames, "centroids": np.array(centroids)}
    return found


def answer_from_pixels(video: torch.Tensor, question: str, config: MovingShapesConfig) -> str:
    objects = read_objects(video, config)
    words = question.rstrip("?").split()
    by_shape = {o["shape"]: c for c, o in objects.items()}
    if question.startswith("what colour is the"):
        return next(iter(objects)) if words[-1] == "object" else by_shape[words[-1]]
    if question.startswith("what shape is the"):
        return next(iter(objects.values()))["shape"] if words[-2] == "the" else objects[words[-2]]["shape"]
    if question.startswith("which way does the"):
        if words[-2] == "object":  # "which way does the object move?": the only object
            assert len(objects) == 1
            obj = next(iter(objects.values()))
        else:
            obj = objects[words[-3]]
            assert obj["shape"] == words[-2]
        d_row, d_col = obj["centroids"][-1] - obj["centroids"][0]
        assert min(abs(d_row), abs(d_col)) == 0 and max(abs(d_row), abs(d_col)) >= config.min_displacement
        if d_col:
            return "right" if d_col > 0 else "left"
        return "down" if d_row > 0 else "up"
    if question.startswith("which"):  # which colour/shape appears first?
        firsts = sorted((o["frames"][0], c) for c, o in objects.items())
        assert firsts[1][0] - firsts[0][0] >= config.order_gap
        first = firsts[0][1]
        return first if words[1] == "colour" else objects[first]["shape"]
    if question == "how many objects are there?":
        return NUMBER_WORDS[len(objects)]
    raise AssertionError(f"unknown question {question!r}")


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(seed=-1), "seed"),
        (dict(max_objects=True), "max_objects"),
        (dict(object_size=3), "object_size"),
        (dict(frame_size=10, object_size=9), "object_size"),
        (dict(colors=("red", "mauve")), "colors"),
        (dict(shapes=("square", "square")), "shapes"),
        (dict(question_types=("color", "size")), "question_types"),
        (dict(question_types=()), "question_types"),
        (dict(min_objects=3, max_objects=2), "min_objects"),
        (dict(max_objects=5), "max_objects"),
        (dict(max_objects=1), "order"),
        (dict(num_frames=5, max_objects=3, colors=("red", "green", "blue"), shapes=SHAPES[:3]), "num_frames"),
        (dict(min_visible_frames=1), "min_visible_frames"),
        (dict(single_object_types=("count",)), "single_object_types"),
        (dict(single_object_types=("color",), min_objects=2), "single_object_types"),
    ],
)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        MovingShapesConfig(**overrides)


def test_config_defaults_and_json_lists():
    cfg = MovingShapesConfig(colors=["red", "blue"], question_types=["color"], frame_size=48)
    assert cfg.colors == ("red", "blue") and cfg.question_types == ("color",)
    assert cfg.object_size == 12 and cfg.min_displacement == 12
    assert MovingShapesConfig(**dataclasses.asdict(cfg)) == cfg
    assert all(f.metadata.get("help") for f in dataclasses.fields(MovingShapesConfig))


# --- dataset --------------------------------------------------------------------------------------------------


def test_items_have_the_documented_form(dataset, config):
    assert len(dataset) == 400
    for i in range(10):
        item = dataset[i]
        assert isinstance(item, VideoQA)
        assert item.video.shape == (8, 3, 32, 32) and item.video.dtype == torch.float32
        assert 0.0 <= item.video.min() and item.video.max() <= 1.0 and item.video.max() > 0
        assert item.qtype == config.question_types[i % 5]
        assert item.category == QUESTION_CATEGORY[item.qtype]
        assert item.answer in answer_set(config, item.qtype) and " " not in item.answer
    assert torch.equal(dataset[-1].video, dataset[399].video)
    with pytest.raises(IndexError):
        dataset[400]
    with pytest.raises(TypeError):
        dataset["0"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=-1), "size"), (dict(split="val"), "split"), (dict(config={"seed": 0}), "config"),
])
def test_dataset_rejects_bad_arguments(config, kwargs, message):
    args = dict(config=config, size=4, split="train") | kwargs
    with pytest.raises(ValueError, match=message):
        MovingShapes(**args)


def test_deterministic_by_seed_and_lazy_generation_is_index_local(config):
    a = MovingShapes(config, 60, "train")
    b = MovingShapes(config, 60, "train")
    for i in reversed(range(60)):  # other access order than a's
        b[i]
    other = MovingShapes(dataclasses.replace(config, seed=1), 60, "train")
    differing = 0
    for i in range(60):
        assert torch.equal(a[i].video, b[i].video) and a[i].question == b[i].question and a[i].answer == b[i].answer
        differing += not torch.equal(a[i].video, other[i].video)
    assert differing >= 55


def test_splits_never_share_a_video_question_pair():
    cfg = tiny_config()

    def pairs(ds):
        return {(ds[i].question, ds[i].video.numpy().tobytes()) for i in range(len(ds))}

    train, test = make_splits(cfg, 600, 600)
    assert (train.split, test.split) == ("train", "test")
    # The config is small enough that two independent draws overlap a lot ...
    assert len(pairs(train) & pairs(MovingShapes(dataclasses.replace(cfg, seed=1), 600, "train"))) > 20
    # ... yet train and test never do.
    assert not pairs(train) & pairs(test)


@pytest.mark.parametrize("split, size", [("train", 400), ("test", 237)])
def test_answers_are_balanced_per_question_type(config, split, size):
    ds = MovingShapes(config, size, split)
    per_type = Counter(ds[i].qtype for i in range(size))
    assert max(per_type.values()) - min(per_type.values()) <= 1
    for qtype in config.question_types:
        answers = Counter(ds[i].answer for i in range(size) if ds[i].qtype == qtype)
        counts = [answers[a] for a in answer_set(config, qtype)]
        assert max(counts) - min(counts) <= 1, (qtype, answers)


def test_every_answer_agrees_with_the_pixels(dataset, config):
    for i in range(len(dataset)):
        item = dataset[i]
        assert answer_from_pixels(item.video, item.question, config) == item.answer, (i, item.question)


def test_reversed_clip_flips_temporal_answers_only(dataset, config):
    flipped = Counter()
    for i in range(len(dataset)):
        item = dataset[i]
        reversed_answer = answer_from_pixels(item.video.flip(0), item.question, config)
        if item.qtype == "direction":
            assert reversed_answer == OPPOSITE_DIRECTION[item.answer]
        elif item.qtype == "order":
            assert reversed_answer != item.answer  # the last to appear is another object
        else:
            assert reversed_answer == item.answer
        flipped[item.qtype] += reversed_answer != item.answer
    assert flipped["direction"] == flipped["order"] == 80


def test_frame_sets_do_not_reveal_time_order(dataset, config):
    """Objects share one visible length, and each trajectory visits a set of positions that the reversed motion
    visits too: a model that ignores frame order cannot answer direction/order above chance."""
    for i in range(len(dataset)):
        objects = read_objects(dataset[i].video, config)
        assert len({len(o["frames"]) for o in objects.values()}) == 1
        for obj in objects.values():
            along = obj["centroids"][:, int(np.ptp(obj["centroids"][:, 1]) > 0)]
            steps = np.diff(along)
            assert (steps >= 0).all() or (steps <= 0).all()
            assert np.allclose(along - along[0], (along[-1] - along[::-1]))


def test_objects_appear_staggered_when_there_are_several(dataset, config):
    counts = Counter()
    for i in range(len(dataset)):
        scene = dataset.scene(i)
        counts[len(scene.objects)] += 1
        firsts = sorted(o.first_frame for o in scene.objects)
        assert all(b - a >= config.order_gap for a, b in zip(firsts, firsts[1:]))
        assert {o.color for o in scene.objects}.__len__() == len(scene.objects)
        assert {o.shape for o in scene.objects}.__len__() == len(scene.objects)
    assert set(counts) == {1, 2}


def test_single_object_types_ask_about_a_lone_object_without_naming_it():
    cfg = MovingShapesConfig(single_object_types=("color", "shape", "direction"))
    ds = MovingShapes(cfg, 200, "test")
    plain = {"color": "what colour is the object?", "shape": "what shape is the object?",
             "direction": "which way does the object move?"}
    objects = Counter()
    for i in range(len(ds)):
        item = ds[i]
        assert answer_from_pixels(item.video, item.question, cfg) == item.answer
        if item.qtype in plain:
            assert item.question == plain[item.qtype] and len(ds.scene(i).objects) == 1
            assert len(ds.scene(i).objects[0].positions) == cfg.num_frames  # on screen in every frame
        objects[item.qtype, len(ds.scene(i).objects)] += 1
    assert objects["order", 2] == 40 and {objects["count", 1], objects["count", 2]} == {20}
    assert set(moving_shapes_vocabulary(cfg)) >= {"object", "way", "move"}


def test_chance_is_one_over_the_answers_a_question_leaves_open():
    assert chance_accuracy(MovingShapesConfig()) == pytest.approx(
        {"color": 0.25, "shape": 0.25, "direction": 0.25, "order": 0.25, "count": 0.5, "static": 0.25,
         "temporal": 1 / 3, "overall": 0.3})
    cfg = MovingShapesConfig(colors=("red", "green", "blue"), shapes=SHAPES, max_objects=3, num_frames=10,
                             question_types=("color", "order", "count"))
    chance = chance_accuracy(cfg)
    # order: a colour question 3 times in 8 (1 in 3 right), a shape question 5 times in 8 (1 in 5 right)
    assert chance["order"] == pytest.approx(3 / 8 * 1 / 3 + 5 / 8 * 1 / 5)
    assert chance["count"] == pytest.approx(1 / 3) and chance["color"] == pytest.approx(1 / 3)
    assert "shape" not in chance and chance["static"] == chance["color"]


def test_larger_configs_generate_consistent_answers():
    cfg = MovingShapesConfig(num_frames=12, frame_size=48, max_objects=3, min_objects=2, seed=5,
                             colors=("red", "green", "blue", "purple", "white"), shapes=SHAPES)
    ds = MovingShapes(cfg, 100, "test")
    for i in range(len(ds)):
        item = ds[i]
        assert item.video.shape == (12, 3, 48, 48)
        assert answer_from_pixels(item.video, item.question, cfg) == item.answer


def test_shapes_are_distinct_at_the_smallest_size():
    for size in range(5, 17):
        masks = {s: shape_mask(s, size) for s in SHAPES}
        assert all(m.any() for m in masks.values())
        assert len({m.tobytes() for m in masks.values()}) == len(SHAPES)
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", 8)


def test_vocabulary_covers_every_question_and_answer(dataset, config):
    vocab = set(dataset.vocabulary())
    for i in range(len(dataset)):
        item = dataset[i]
        words = item.question.replace("?", " ? ").split() + [item.answer]
        assert set(words) <= vocab, set(words) - vocab
    assert set(DIRECTIONS) | set(config.colors) | set(config.shapes) | {"one", "two"} <= vocab


def test_generation_is_fast(config):
    start = time.perf_counter()
    ds = MovingShapes(config, 2000, "train").materialize()
    ds[1999]
    assert time.perf_counter() - start < 15.0  # ~1 s on a laptop core; generous for loaded CI machines


# --- tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens_bos_and_round_trip():
    tok = build_word_tokenizer(["what", "colour", "is", "the", "square", "?", "red"])
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")
    ids = tok("What colour is the SQUARE?")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "what colour is the square ?"
    assert tok("what colour is the banana ?")["input_ids"][5] == tok.unk_token_id
    assert tok("red", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("red")]


def test_tokenizer_pads_on_both_sides():
    tok = build_word_tokenizer(["a", "b", "c"])
    right = tok(["a", "a b c"], padding=True, return_tensors="pt")
    assert right["input_ids"][0].tolist() == [2, tok.convert_tokens_to_ids("a"), 0, 0]
    assert right["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    tok.padding_side = "left"
    left = tok(["a", "a b c"], padding=True, return_tensors="pt")
    assert left["input_ids"][0].tolist() == [0, 0, 2, tok.convert_tokens_to_ids("a")]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_tokenizer_add_special_tokens_and_extra_special_tokens():
    tok = build_word_tokenizer(["question", ":", "red"], extra_special_tokens=["<frame>"])
    assert tok.add_tokens([VIDEO], special_tokens=True) == 1
    ids = tok(f"{VIDEO}question: RED <frame>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", VIDEO, "question", ":", "red", "<frame>"]
    assert len(tok) == 4 + 3 + 2
    assert tok.decode(ids, skip_special_tokens=True) == "question : red"
    bare = build_word_tokenizer(["red"], extra_special_tokens=VIDEO)  # one token given as a bare string
    assert bare.convert_ids_to_tokens(bare(f"{VIDEO} red")["input_ids"]) == ["<s>", VIDEO, "red"]


def test_tokenizer_save_load_round_trip_offline(tmp_path, monkeypatch, config):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = moving_shapes_tokenizer(config)
    tok.add_tokens([VIDEO], special_tokens=True)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = format_prompt("which way does the red cross move?", VIDEO)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert loaded(text)["input_ids"][:2] == [loaded.bos_token_id, loaded.convert_tokens_to_ids(VIDEO)]


@pytest.mark.parametrize("words, extra, message", [
    ([], (), "empty"),
    ("red", (), "single string"),
    (["two words"], (), "split"),
    (["don't"], (), "split"),
    ([3], (), "strings"),
    (["red"], ["red"], "already"),
    (["red"], [" <v> "], "outer spaces"),
])
def test_build_word_tokenizer_rejects_bad_input(words, extra, message):
    with pytest.raises(ValueError, match=message):
        build_word_tokenizer(words, extra_special_tokens=extra)


def test_moving_shapes_tokenizer_knows_every_word(dataset, tok):
    for i in range(len(dataset)):
        item = dataset[i]
        ids = tok(format_prompt(item.question, VIDEO))["input_ids"]
        assert tok.unk_token_id not in ids
        assert len(tok(" " + item.answer, add_special_tokens=False)["input_ids"]) == 1  # one-token answers


# --- collator -------------------------------------------------------------------------------------------------


def test_collator_train_batch_supervises_answer_and_eos_only(dataset, tok):
    items = [dataset[i] for i in range(6)]
    batch = VideoQACollator(tok)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "videos"}
    assert batch["videos"].shape == (6, 8, 3, 32, 32)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == labels.dtype == torch.long
    for row, item in enumerate(items):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert (ids[row, n:] == tok.pad_token_id).all() and (labels[row, n:] == IGNORE_INDEX).all()
        supervised = labels[row] != IGNORE_INDEX
        assert supervised.nonzero().flatten().tolist() == [n - 2, n - 1]
        assert labels[row, n - 2:n].tolist() == [tok.convert_tokens_to_ids(item.answer), tok.eos_token_id]
        assert torch.equal(ids[row, n - 2:n], labels[row, n - 2:n])
        tokens = tok.convert_ids_to_tokens(ids[row, : n - 2])
        assert tokens[:4] == ["<s>", VIDEO, "question", ":"] and tokens[-2:] == ["answer", ":"]
        assert tok.decode(ids[row, 4 : n - 4]) == item.question.replace("?", " ?")


def test_collator_eval_batch_is_left_padded_prompts(dataset, tok):
    items = [dataset[i] for i in range(5)]
    batch = VideoQACollator(tok, train=False)(items)
    assert "labels" not in batch
    assert batch["answers"] == [it.answer for it in items] and batch["qtypes"] == [it.qtype for it in items]
    assert batch["questions"] == [it.question for it in items]
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # questions differ in length
    for row in range(5):
        n = int(mask[row].sum())
        assert not mask[row, : mask.shape[1] - n].any()
        assert tok.convert_ids_to_tokens(batch["input_ids"][row, -2:]) == ["answer", ":"]
    right = VideoQACollator(tok, train=False, padding_side="right")(items)
    assert right["attention_mask"][:, 0].all()
    left_train = VideoQACollator(tok, padding_side="left")(items)
    assert left_train["attention_mask"][:, -1].all() and (left_train["labels"][:, -1] == tok.eos_token_id).all()


def test_collator_without_video_token(dataset, config):
    tok = moving_shapes_tokenizer(config)  # no <video> in it: fine when the prompt has no placeholder
    batch = VideoQACollator(tok, video_token=None)([dataset[0]])
    assert tok.convert_ids_to_tokens(batch["input_ids"][0, :3]) == ["<s>", "question", ":"]


def test_collator_missing_video_token_is_a_clear_error(config):
    tok = moving_shapes_tokenizer(config)
    with pytest.raises(ValueError, match=r"does not know the video token.*wrap the model first.*add_tokens"):
        VideoQACollator(tok, video_token=VIDEO)


def test_collator_pads_frames_and_returns_frame_mask(tok):
    short = VideoQA(torch.rand(3, 3, 16, 16), "what colour is the square?", "red", "color", "static")
    long = VideoQA(torch.rand(5, 3, 16, 16), "what shape is the red object?", "square", "shape", "static")
    batch = VideoQACollator(tok)([short, long])
    assert batch["videos"].shape == (2, 5, 3, 16, 16)
    assert batch["frame_mask"].dtype == torch.bool
    assert batch["frame_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert torch.equal(batch["videos"][0, :3], short.video) and not batch["videos"][0, 3:].any()
    assert torch.equal(batch["videos"][1], long.video)
    assert "frame_mask" not in VideoQACollator(tok)([short, short])


def test_collator_rejects_bad_batches(tok, config):
    item = VideoQA(torch.rand(2, 3, 16, 16), "what colour is the square?", "red", "color", "static")
    odd = VideoQA(torch.rand(2, 3, 8, 8), "what colour is the square?", "red", "color", "static")
    empty = VideoQA(torch.rand(0, 3, 16, 16), "what colour is the square?", "red", "color", "static")
    collate = VideoQACollator(tok)
    with pytest.raises(ValueError, match="frame shape"):
        collate([item, odd])
    with pytest.raises(ValueError, match="no frames"):
        collate([item, empty])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="padding_side"):
        VideoQACollator(tok, padding_side="middle")
    no_pad = moving_shapes_tokenizer(config)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        VideoQACollator(no_pad, video_token=None)


# --- evaluate -------------------------------------------------------------------------------------------------


class ScriptedModel(nn.Module):
    """A stand-in for VideoModel whose answer to each prompt comes from a function of (question, video).

    It checks the calling contract: eval mode, inference mode, left-padded prompts, greedy decoding.
    """

    def __init__(self, tokenizer, reply, video_token=VIDEO):
        super().__init__()
        self.tokenizer = tokenizer
        self.video_token = video_token
        self.reply = reply  # (question, video) -> list of tokens to "generate"
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls = []

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, videos, frame_mask=None, max_new_tokens=1, do_sample=True,
                 **kwargs):
        assert not self.training and torch.is_inference_mode_enabled() and do_sample is False
        assert attention_mask[:, -1].all()  # left padding: generation continues from the last column
        self.calls.append({"videos": videos, "frame_mask": frame_mask, "input_ids": input_ids})
        rows = []
        for ids, mask, video in zip(input_ids, attention_mask, videos):
            text = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            question = text.removeprefix("question : ").removesuffix(" answer :").replace(" ?", "?")
            new = self.tokenizer.convert_tokens_to_ids(self.reply(question, video))[:max_new_tokens]
            rows.append(new + [self.tokenizer.pad_token_id] * (max_new_tokens - len(new)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


def test_evaluate_scores_per_type_category_and_overall(tok, config):
    ds = MovingShapes(config, 53, "test")
    truth = {(ds[i].question, ds[i].video.numpy().tobytes()): ds[i] for i in range(len(ds))}

    def reply(question, video):
        item = truth[(question, video.numpy().tobytes())]
        if item.qtype in ("color", "direction"):
            return [item.answer, "</s>"]
        if item.qtype == "shape":
            return ["</s>", item.answer]  # stopped before answering: wrong
        return ["red" if item.answer != "red" else "blue"]  # a wrong word

    vm = ScriptedModel(tok, reply)
    vm.train()
    result = evaluate(vm, ds, batch_size=8)
    assert vm.training  # restored
    n = Counter(ds[i].qtype for i in range(len(ds)))
    assert list(result) == ["color", "shape", "direction", "order", "count", "static", "temporal", "overall"]
    assert result == {
        "color": 1.0, "shape": 0.0, "direction": 1.0, "order": 0.0, "count": 0.0,
        "static": n["color"] / (n["color"] + n["shape"]),
        "temporal": n["direction"] / (n["direction"] + n["order"] + n["count"]),
        "overall": (n["color"] + n["direction"]) / 53,
    }
    assert len(vm.calls) == 7 and [c["videos"].shape[0] for c in vm.calls] == [8] * 6 + [5]
    assert all(VIDEO in tok.convert_ids_to_tokens(c["input_ids"][0]) for c in vm.calls)


def test_evaluate_fractional_accuracy_transform_and_text_only_prompts(tok, config):
    ds = MovingShapes(config, 40, "test")
    vm = ScriptedModel(tok, lambda question, video: ["red"]).eval()
    result = evaluate(vm, ds, batch_size=16, max_new_tokens=1, include_video_token=False,
                      video_transform=lambda v: v.mean(dim=(3, 4)))
    assert not vm.training
    for qtype in config.question_types:
        items = [ds[i] for i in range(40) if ds[i].qtype == qtype]
        assert result[qtype] == pytest.approx(sum(it.answer == "red" for it in items) / len(items))
    assert result["overall"] == pytest.approx(sum(ds[i].answer == "red" for i in range(40)) / 40)
    assert 0 < result["color"] < 1
    assert all(c["videos"].shape[1:] == (8, 3) for c in vm.calls)  # transformed before generate
    video_id = tok.convert_tokens_to_ids(VIDEO)
    assert all((c["input_ids"] != video_id).all() for c in vm.calls)


def test_evaluate_passes_frame_mask_for_mixed_lengths(tok):
    items = [VideoQA(torch.rand(t, 3, 16, 16), "how many objects are there?", "one", "count", "temporal")
             for t in (2, 4, 3)]
    vm = ScriptedModel(tok, lambda question, video: ["one"])
    assert evaluate(vm, items) == {"count": 1.0, "temporal": 1.0, "overall": 1.0}
    assert vm.calls[0]["frame_mask"].tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]


def test_evaluate_rejects_bad_arguments_and_bad_generate_output(tok, config):
    ds = MovingShapes(config, 4, "test")
    vm = ScriptedModel(tok, lambda question, video: ["red"])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(vm, ds, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(vm, ds, max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(vm, [])
    vm.generate = lambda input_ids, **kwargs: torch.zeros(input_ids.shape[0], 1, dtype=torch.long)  # new tokens only
    vm.train()
    with pytest.raises(ValueError, match="prompt length"):
        evaluate(vm, ds)
    assert vm.training  # restored on errors too
