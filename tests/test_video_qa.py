"""The LLaVA-Video / Video-ChatGPT JSONL loader on MP4 files written here: lazy decoding through the VisionEncoder and
its FeatureCache, the chat template when the tokenizer has one, labels only on the answers, bad rows named."""

import json

import pytest
import torch
from test_video_encoder import tiny_clip
from video_files import write_mp4

from video2param.data import IGNORE_INDEX, VideoQADataset
from video2param.data.tokenizer import build_word_tokenizer
from video2param.video.cache import FeatureCache
from video2param.video.encoder import VisionEncoder

WORDS = ("what is the man holding a red umbrella where he going into station colour of car blue user assistant "
         "system you are helpful : . ? question answer").split()
FRAMES = 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [write_mp4(folder / f"clip{i}.mp4", num_frames=8, first_index=10 * i) for i in range(2)]


@pytest.fixture
def encoder():
    return VisionEncoder(tiny_clip(), progress=False)


def _tokenizer(template: bool = False):
    tok = build_word_tokenizer(WORDS, extra_special_tokens=["<video>"])
    if template:
        tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                             "{% if add_generation_prompt %}assistant : {% endif %}")
    return tok


def _write(path, rows):
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _rows(clips):
    return [
        {"video": clips[0], "conversations": [{"from": "human", "value": "<video>\nWhat is the man holding?"},
                                              {"from": "gpt", "value": "A red umbrella."}]},
        {"video": "clip1.mp4", "conversations": [
            {"from": "system", "value": "You are helpful."},
            {"from": "human", "value": "What colour is the car?"},  # no mark: the video opens this turn
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Where is he going?"},
            {"from": "gpt", "value": "Into the station."}]},
    ]


def _answers(tok, item):
    ids, labels = item["input_ids"], item["labels"]
    return tok.decode(ids[labels != IGNORE_INDEX].tolist())


def test_items_decode_lazily_through_the_cache_and_supervise_only_the_answers(tmp_path, clips, encoder):
    tok = _tokenizer()
    data = _write(tmp_path / "train.jsonl", _rows(clips))
    cache = FeatureCache(tmp_path / "cache")
    ds = VideoQADataset(data, tok, encoder, num_frames=FRAMES, cache=cache, video_root=clips[0].rsplit("/", 1)[0])
    assert len(ds) == 2 and cache.misses == 0  # nothing decoded when the file is opened
    first = ds[0]
    assert first["videos"].shape == (FRAMES, 16, 32) and cache.misses == 1
    again = ds[0]
    assert cache.hits == 1 and torch.equal(again["videos"], first["videos"])
    torch.testing.assert_close(first["videos"], encoder.encode_video(clips[0], num_frames=FRAMES).features)
    video_id = tok.convert_tokens_to_ids("<video>")
    for item in (first, ds[1]):
        assert int((item["input_ids"] == video_id).sum()) == 1
        assert item["labels"][item["input_ids"] == video_id].eq(IGNORE_INDEX).all()
    assert _answers(tok, first) == "a red umbrella . </s>"
    assert _answers(tok, ds[1]) == "blue . </s> into the station . </s>"
    assert tok.decode(first["input_ids"].tolist()) == (
        "<s> <video> question : what is the man holding ? answer : a red umbrella . </s>")
    second = tok.decode(ds[1]["input_ids"].tolist())
    assert second.index("<video>") < second.index("colour")  # put in front of the first human turn


def test_the_chat_template_is_used_and_answers_include_the_turn_end(tmp_path, clips, encoder):
    tok = _tokenizer(template=True)
    ds = VideoQADataset(_write(tmp_path / "train.json", _rows(clips)), tok, encoder, num_frames=FRAMES,
                        video_root=clips[0].rsplit("/", 1)[0])
    item = ds[1]
    text = tok.decode(item["input_ids"].tolist())
    assert text.startswith("system : you are helpful . </s> user : <video> what colour")
    assert _answers(tok, item) == "blue . </s> into the station . </s>"
    batch = ds.collate([ds[0], item])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["videos"].shape == (2, FRAMES, 16, 32)
    pad = batch["attention_mask"] == 0
    assert pad.any() and batch["labels"][pad].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize("template", [False, True])
def test_ask_renders_the_prompt_the_dataset_trains_on(tmp_path, clips, encoder, template):
    # `video2param ask` must put the question to the model the way training did, chat template included.
    from video2param.data import question_prompt_ids

    tok = _tokenizer(template=template)
    ds = VideoQADataset(_write(tmp_path / "train.json", _rows(clips)[:1]), tok, encoder, num_frames=FRAMES)
    item = ds[0]
    prompt = item["input_ids"][item["labels"] == IGNORE_INDEX].tolist()
    answer_start = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
    assert prompt == item["input_ids"][:answer_start].tolist()  # the prompt is the prefix before the answer
    assert question_prompt_ids(tok, "What is the man holding?", "<video>") == prompt


@pytest.mark.parametrize("row,problem", [
    ({"conversations": [{"from": "human", "value": "<video> hi"}, {"from": "gpt", "value": "yes"}]}, "no video"),
    ({"video": "missing.mp4", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]},
     "video 'missing.mp4' not found"),
    ({"video": "clip0.mp4", "conversations": [{"from": "gpt", "value": "yes"}]}, "no human turn"),
    ({"video": "clip0.mp4", "conversations": [{"from": "human", "value": "<video> a <video>"},
                                              {"from": "gpt", "value": "yes"}]}, "2 video marks"),
    ({"video": "clip0.mp4", "conversations": [{"from": "human", "value": "<video> a"},
                                              {"from": "gpt", "value": "b"}, {"from": "human", "value": "<video>"},
                                              {"from": "gpt", "value": "c"}]}, "2 video marks"),
    ({"video": "clip0.mp4", "conversations": [{"from": "human", "value": "hi"}]}, "no gpt turn"),
    ({"video": "clip0.mp4", "conversations": [{"from": "robot", "value": "hi"}]}, "unknown role 'robot'"),
    ({"video": "clip0.mp4", "conversations": [{"from": "human", "value": "hi"},
                                              {"from": "gpt", "value": "<video>"}]}, "in a assistant turn"),
])
def test_bad_rows_are_refused_naming_the_row(tmp_path, clips, encoder, row, problem):
    good = _rows(clips)[0]
    data = _write(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(ValueError, match=rf"bad.jsonl: row 3: .*{problem}"):
        VideoQADataset(data, _tokenizer(), encoder, video_root=clips[0].rsplit("/", 1)[0])


def test_bad_files_and_arguments(tmp_path, clips, encoder):
    tok = _tokenizer()
    (tmp_path / "broken.jsonl").write_text('{"video": "a.mp4"}\n{not json\n')
    with pytest.raises(ValueError, match="broken.jsonl: row 2 is not valid JSON"):
        VideoQADataset(tmp_path / "broken.jsonl", tok, encoder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoQADataset(tmp_path / "none.jsonl", tok, encoder)
    data = _write(tmp_path / "ok.jsonl", _rows(clips)[:1])
    with pytest.raises(ValueError, match="does not know the video token"):
        VideoQADataset(data, build_word_tokenizer(WORDS), encoder)
    with pytest.raises(ValueError, match="num_frames"):
        VideoQADataset(data, tok, encoder, num_frames=0)
    with pytest.raises(ValueError, match="encoder"):
        VideoQADataset(data, tok, object())
    # A file that exists but is no video fails when read, naming the row.
    (tmp_path / "fake.mp4").write_bytes(b"not a video")
    fake = _write(tmp_path / "fake.jsonl", [{**_rows(clips)[0], "video": "fake.mp4"}])
    with pytest.raises(ValueError, match="fake.jsonl: row 1: cannot read video"):
        VideoQADataset(fake, tok, encoder)[0]
    short = VideoQADataset(data, tok, encoder, max_length=4)
    with pytest.raises(ValueError, match="row 1: the first answer does not fit"):
        short[0]
