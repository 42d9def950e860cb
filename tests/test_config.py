import json

import pytest

from video2param import VideoAdapterConfig, available_methods


def test_defaults_and_json_round_trip(tmp_path):
    cfg = VideoAdapterConfig(method="llava", num_frames=8, vision_hidden_size=16, options={"spatial_pool": 2})
    path = tmp_path / "cfg.json"
    cfg.save(path)
    again = VideoAdapterConfig.load(path)
    assert again == cfg
    assert again.method_options().spatial_pool == 2
    assert json.loads(path.read_text())["targets"] == ["q", "k", "v", "o", "mlp"]


def test_builtin_methods_registered():
    assert {"llava", "vipe"} <= set(available_methods())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "nope"}, "method"),
        ({"num_frames": 0}, "num_frames"),
        ({"rank": -1}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"inject_every": 0}, "inject_every"),
        ({"inject_layers": [0, 0]}, "inject_layers"),
        ({"inject_layers": []}, "inject_layers"),
        ({"inject_every": None}, "inject_every"),
        ({"targets": ("q", "x")}, "targets"),
        ({"targets": ()}, "targets"),
        ({"video_token": " "}, "video_token"),
        ({"vision_hidden_size": 0}, "vision_hidden_size"),
        ({"method": "llava", "options": {"bogus": 1}}, "options"),
        ({"method": "llava", "options": {"spatial_pool": 0}}, "options.spatial_pool"),
        ({"method": "vipe", "options": {"depth": 2, "keep_ratios": [1.0]}}, "options.keep_ratios"),
        ({"method": "vipe", "options": {"hidden_dim": 30, "num_heads": 4}}, "options.num_heads"),
    ],
)
def test_bad_value_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        VideoAdapterConfig(**kwargs)


def test_unknown_json_field_is_rejected():
    with pytest.raises(ValueError, match="unknown field"):
        VideoAdapterConfig.from_dict({"method": "llava", "frames": 3})


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VideoAdapterConfig.load(path)


def test_split_kwargs_routes_options():
    cfg = VideoAdapterConfig.split_kwargs("vipe", {"rank": 8, "depth": 1, "hidden_dim": 32, "num_heads": 4})
    assert cfg.rank == 8 and cfg.options["depth"] == 1 and cfg.options["keep_ratios"] == [1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 1e9}, r"num_frames: expected an int, got 1000000000.0 \(float\)"),
        ({"num_frames": 10**9}, "num_frames: must be <= 16384"),
        ({"rank": 10**6}, "rank: must be <= 2048"),
        ({"vision_hidden_size": 2**20}, "vision_hidden_size: must be <= 16384"),
        ({"inject_every": 10**6}, "inject_every: must be <= 4096"),
        ({"inject_layers": [0, 10**6]}, r"inject_layers\[1\]: must be <= 4095"),
        ({"alpha": float("inf")}, "alpha: expected a finite number, got inf"),
        ({"alpha": float("nan")}, "alpha: expected a finite number, got nan"),
        ({"alpha": "64"}, "alpha: expected a finite number, got '64' \\(str\\)"),
        ({"targets": 5}, "targets: expected a list"),
        ({"targets": ["q", 5]}, r"targets\[1\]: expected one of 'q', 'k', 'v', 'o', 'mlp', got 5 \(int\)"),
        ({"rank": True}, r"rank: expected an int, got True \(bool\)"),
        ({"method": 3}, r"method: expected a string, got 3 \(int\)"),
        ({"options": [1]}, r"options: expected a dict"),
        ({"method": "vipe", "options": {"merge": "false"}}, r"options.merge: expected a bool, got 'false' \(str\)"),
        ({"method": "vipe", "options": {"keep_ratios": "ab"}}, r"options.keep_ratios: expected a list of finite numbers"),
        ({"method": "vipe", "options": {"dropout": "x"}}, r"options.dropout: expected a finite number, got 'x' \(str\)"),
        ({"method": "vipe", "options": {"depth": 2.0}}, r"options.depth: expected an int, got 2.0 \(float\)"),
        ({"method": "llava", "options": {"temporal_embedding": 1}}, r"options.temporal_embedding: expected a bool"),
    ],
)
def test_every_option_is_type_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoAdapterConfig(**kwargs)


@pytest.mark.parametrize(
    "good, bad, field",
    [
        ('"merge": true', '"merge": "false"', "options.merge"),
        ('"alpha": 64.0', '"alpha": Infinity', "alpha"),
        ('"num_frames": 32', '"num_frames": 1e9', "num_frames"),
    ],
)
def test_bad_values_in_a_json_file_are_refused_at_load(tmp_path, good, bad, field):
    text = VideoAdapterConfig(method="vipe", vision_hidden_size=8).to_json_string()
    assert good in text
    path = tmp_path / "cfg.json"
    path.write_text(text.replace(good, bad))
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        VideoAdapterConfig.load(path)


def test_json_lists_become_tuples_and_sorted_layers():
    cfg = VideoAdapterConfig(targets=["q", "v"], inject_layers=(3, 1), alpha=3)
    assert cfg.targets == ("q", "v") and cfg.inject_layers == [1, 3] and cfg.alpha == 3.0 and type(cfg.alpha) is float
    assert VideoAdapterConfig(targets="k").targets == ("k",)
