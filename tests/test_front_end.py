"""The demo's vision front end (object grid), its saved form, feature statistics, and MP4 round trips."""

import pytest
import torch

from video2param.data import MovingShapes, MovingShapesConfig
from video2param.data.features import FeatureStandardizer, encode_dataset, load_vision, save_vision
from video2param.data.front_end import ObjectGridConfig, ObjectGridFrontEnd, is_front_end_dir
from video2param.data.moving_shapes import PALETTE, SHAPES, Scene, SceneObject, render_scene
from video2param.data.video_file import write_mp4


def _scene_video(cfg: MovingShapesConfig, objects: list[SceneObject]) -> torch.Tensor:
    """The first two frames of ``objects`` drawn by the benchmark's renderer (each object visible in both)."""
    frames = render_scene(cfg, Scene(tuple(objects), "q", "a", "color"))[:2]
    return torch.from_numpy(frames).float() / 255


def test_each_object_is_one_token_with_its_colour_position_and_shape():
    cfg = MovingShapesConfig()
    square = SceneObject("red", "square", "right", 0, ((2, 2), (2, 14)))
    video = _scene_video(cfg, [square])
    features = ObjectGridFrontEnd(ObjectGridConfig(grid=4))(video)
    assert features.shape == (2, 16, 9 + 16)
    for t, (cell, centre_col) in enumerate([(0, 6), (2, 18)]):
        present = torch.nonzero(features[t, :, 0]).flatten().tolist()
        assert present == [cell]
        token = features[t, cell]
        assert torch.allclose(token[1:4], torch.tensor(PALETTE["red"]) / 255)
        assert torch.allclose(token[4:6], torch.tensor([2 * 6 / 32 - 1, 2 * centre_col / 32 - 1]))
        assert torch.allclose(token[6:9], torch.tensor([1.0, 1.0, 1.0]))  # 8x8 box = one 8-pixel cell, full
        assert torch.equal(token[9:], torch.ones(16))  # a square fills every bin of its box


def test_shapes_get_distinct_descriptions():
    cfg = MovingShapesConfig(shapes=SHAPES)
    front_end = ObjectGridFrontEnd()
    shapes = [front_end(_scene_video(cfg, [SceneObject("blue", s, "up", 0, ((12, 12), (4, 12)))]))[0].amax(0)[9:]
              for s in SHAPES]
    for i in range(len(SHAPES)):
        for j in range(i):
            assert (shapes[i] - shapes[j]).abs().max() > 0.2, (SHAPES[i], SHAPES[j])


def test_two_centres_in_one_cell_keep_both_objects():
    cfg = MovingShapesConfig()
    a = SceneObject("red", "square", "right", 0, ((0, 0), (0, 4)))
    b = SceneObject("green", "circle", "right", 0, ((9, 5), (9, 6)))  # both centres in the top-left 16-px cell
    features = ObjectGridFrontEnd(ObjectGridConfig(grid=2))(_scene_video(cfg, [a, b]))
    for t in range(2):
        colours = {tuple(torch.round(features[t, c, 1:4] * 255).int().tolist())
                   for c in torch.nonzero(features[t, :, 0]).flatten().tolist()}
        assert colours == {PALETTE["red"], PALETTE["green"]}


def test_blank_frames_give_zeros_and_bad_input_is_refused():
    front_end = ObjectGridFrontEnd()
    assert torch.equal(front_end(torch.zeros(3, 3, 32, 32)), torch.zeros(3, 4, 25))
    with pytest.raises(ValueError, match="pixel_values"):
        front_end(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="multiple of grid"):
        ObjectGridConfig(image_size=30, grid=4)


def test_vision_directory_round_trip_and_mp4_features_match_the_frames(tmp_path):
    cfg = MovingShapesConfig()
    data = MovingShapes(cfg, 10, "test")
    front_end = ObjectGridFrontEnd(ObjectGridConfig(grid=2))
    encoder = front_end.vision_encoder(progress=False)
    items = encode_dataset(data, encoder, progress=False)
    standardizer = FeatureStandardizer.fit([it.video for it in items])
    save_vision(tmp_path / "vision", standardizer, front_end=front_end)
    assert is_front_end_dir(tmp_path / "vision")
    loaded, stats = load_vision(tmp_path / "vision")
    assert loaded.tower.config == front_end.config and loaded.num_patches == 4
    assert torch.equal(stats.mean, standardizer.mean) and torch.equal(stats.std, standardizer.std)

    from video2param.video.io import load_video

    for i in range(3):
        video = write_mp4(tmp_path / f"clip{i}.mp4", data[i].video)
        clip = load_video(video, num_frames=cfg.num_frames)
        assert clip.frames.shape == (cfg.num_frames, 128, 128, 3)  # enlarged 4x for viewing
        assert (loaded.encode_frames(clip.frames) - items[i].video).abs().max() < 0.05
