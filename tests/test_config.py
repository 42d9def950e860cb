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
