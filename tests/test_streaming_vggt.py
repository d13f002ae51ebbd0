"""The geometry stage (streaming_vggt.py): windows in, Samples out, checked against exact truth.

Without vggt: the oracle backend (tests/oracle_backend.py) renders a synthetic room whose depth,
cameras and surfaces are known exactly; its model reads each frame's barcode and answers with
the truth, so every number the stage writes is checked against ground truth (SPEC "Conventions
inside a sample"): reprojection, poses in both world frames, points on the surfaces, frame order,
confidence filter and point cap.

With vggt (skipped without it): a tiny randomly-initialised VGGT through the real code path
(make_vggt + VGGTModel + GeometryStage), checkpoint loading (load_vggt_state_dict, the function
behind --model), and one `slow` test with the full-size architecture.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import oracle_backend
import streaming_vggt
import videos
from frames import FrameSource
from sharded_writer import encode_sample
from checkpoint import CheckpointError
from streaming_vggt import (GeometryConfig, GeometryStage, Sample, load_backend, load_vggt_state_dict,
                            make_vggt)

ALL = 10**9  # max_points that never caps


# ============================================================================= helpers


def _to4(E: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(E, np.float64), [[0.0, 0.0, 0.0, 1.0]]], axis=0)


def true_relative(frame: int, anchor: int) -> np.ndarray:
    """Exact world-to-camera [3, 4] of scene frame `frame` in the world = camera of `anchor`."""
    return (_to4(oracle_backend.scene_pose(frame)) @ np.linalg.inv(_to4(oracle_backend.scene_pose(anchor))))[:3]


def anchor_frame(sample: Sample) -> int:
    """The video frame whose camera is the sample's world (SPEC: earliest window frame, or focal)."""
    return sample.window_frame_indices[0] if sample.world_frame == "first" else sample.frame_index


def to_scene_world(xyz: torch.Tensor, anchor: int) -> np.ndarray:
    """Points [N, 3] in the sample's world (camera `anchor`) -> the oracle scene's world."""
    world_from_anchor = np.linalg.inv(_to4(oracle_backend.scene_pose(anchor)))
    p = xyz.double().numpy()
    return p @ world_from_anchor[:3, :3].T + world_from_anchor[:3, 3]


def project(xyz: torch.Tensor, extrinsic: torch.Tensor, intrinsic: torch.Tensor):
    """World points [..., 3] -> (pixel coordinates [..., 2], camera z [...]), in float64."""
    E, K = extrinsic.double(), intrinsic.double()
    cam = xyz.double() @ E[:, :3].T + E[:, 3]
    pix = cam @ K.T
    return pix[..., :2] / pix[..., 2:], cam[..., 2]


def pixel_grid(H: int, W: int) -> torch.Tensor:
    """[H, W, 2] (u, v) pixel centres at integer coordinates."""
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.stack([u, v], dim=-1)


def locate_points(sample: Sample, frames_u8: torch.Tensor, tol: float = 0.01) -> torch.Tensor:
    """For every point of `sample`, the flat index s*H*W + v*W + u of the window pixel it was
    unprojected from, found without the tool's bookkeeping: the frame where the point projects
    with that frame's written camera closest to a pixel centre (within `tol` px), in front of the
    camera, onto a pixel of exactly the point's colour. -1 where no frame fits."""
    S, H, W, _ = frames_u8.shape
    xyz, rgb = sample.points[:, :3], sample.points[:, 3:]
    found = torch.full((xyz.shape[0],), -1, dtype=torch.int64)
    best = torch.full((xyz.shape[0],), tol, dtype=torch.float64)
    for s in range(S):
        uv, z = project(xyz, sample.window_extrinsics[s], sample.window_intrinsics[s])
        r = uv.nan_to_num(-10).round()
        residual = (uv - r).abs().amax(-1)
        ok = (z > 0) & (residual < best)
        ok &= (r[:, 0] >= 0) & (r[:, 0] < W) & (r[:, 1] >= 0) & (r[:, 1] < H)
        u, v = r[:, 0].long().clamp(0, W - 1), r[:, 1].long().clamp(0, H - 1)
        ok &= (frames_u8[s][v, u].float() / 255 == rgb).all(-1)
        found[ok] = s * H * W + v[ok] * W + u[ok]
        best[ok] = residual[ok]
    return found


TENSOR_FIELDS = ("depth", "extrinsic", "intrinsic", "window_extrinsics", "window_intrinsics", "points")
META_FIELDS = ("video", "frame_index", "timestamp", "fps", "dilation", "window_frame_indices",
               "window_timestamps", "world_frame")


def assert_samples_close(a: Sample, b: Sample, rtol: float, atol: float) -> None:
    for name in META_FIELDS:
        assert getattr(a, name) == getattr(b, name), name
    assert torch.equal(a.rgb, b.rgb)
    for name in TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.allclose(x, y, rtol=rtol, atol=atol), f"{name}: max diff {(x - y).abs().max().item():.3g}"
    assert a.quality.keys() == b.quality.keys()
    for k in a.quality:
        assert a.quality[k] == pytest.approx(b.quality[k], rel=rtol, abs=atol), k


def sample_bytes(sample: Sample) -> dict[str, bytes]:
    return encode_sample(sample)


# ============================================================================= oracle fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread_for_the_module():
    """torch on one thread for this module (module fixtures included): on a small shared machine
    two intra-op threads waiting for each other made the tiny VGGT's forward 5-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




@pytest.fixture(scope="module")
def scene_windows(tmp_path_factory):
    """Two windows (kernel 5, stride 3, dilation 2) of a 14-frame oracle scene at 518x294 (the
    model grid itself: no resampling between the rendered truth and what the model sees)."""
    path = oracle_backend.render_scene_video(tmp_path_factory.mktemp("scene") / "scene.mp4", num_frames=14)
    source = FrameSource(str(path))
    windows = list(source.windows(kernel=5, stride=3, dilation=2))
    source.close()
    assert [w.window.frame_indices for w in windows] == [(0, 2, 4, 6, 8), (3, 5, 7, 9, 11)]
    assert windows[0].frames.shape == (5, 294, 518, 3)
    return windows


@pytest.fixture(scope="module")
def oracle_run(scene_windows):
    """run(batch=(0, 1), **GeometryConfig fields) -> (samples, frame indices the model saw per
    call). Memoised: many tests look at the same run."""
    cache = {}

    def run(batch=(0, 1), scale=None, **config):
        key = (tuple(batch), scale, tuple(sorted(config.items())))
        if key not in cache:
            model = oracle_backend.make("cpu", scale=scale)
            stage = GeometryStage(model, "cpu", GeometryConfig(**config))
            cache[key] = (stage([scene_windows[i] for i in batch]), model.calls)
        return cache[key]

    return run


# ============================================================================= 3. exact geometry (oracle, no vggt)


@pytest.mark.parametrize("focal_first", [True, False])
@pytest.mark.parametrize("world_frame", ["first", "focal"])
def test_focal_points_reproject_onto_their_pixels_at_the_stored_depth(oracle_run, scene_windows, world_frame, focal_first):
    samples, _ = oracle_run(world_frame=world_frame, focal_first=focal_first, conf_percentile=0, max_points=ALL)
    for sample, window in zip(samples, scene_windows):
        S, (H, W) = len(sample.window_frame_indices), sample.depth.shape
        # nothing filtered or capped: every pixel of every frame, flat order (s, v, u)
        assert sample.points.shape == (S * H * W, 6)
        focal = sample.points.reshape(S, H, W, 6)[S // 2]
        uv, z = project(focal[..., :3], sample.extrinsic, sample.intrinsic)
        assert (uv - pixel_grid(H, W)).norm(dim=-1).max() < 0.05  # the pixel it came from
        assert torch.allclose(z, sample.depth.double(), rtol=1e-5, atol=0)  # at the stored depth
        assert torch.equal(focal[..., 3:], window.frames[S // 2].float() / 255)  # with its colour
        assert torch.equal(sample.rgb, window.frames[S // 2])
        # the stored depth and intrinsic are the truth (z-depth along the focal camera's axis)
        K = oracle_backend.scene_intrinsic(W, H)
        _, true_depth = oracle_backend.render_view(sample.frame_index, K, H, W)
        assert np.abs(sample.depth.double().numpy() / true_depth - 1).max() < 1e-5
        assert np.allclose(sample.intrinsic.double().numpy(), K, rtol=1e-6, atol=1e-4)
        assert np.allclose(sample.window_intrinsics.double().numpy(), K, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("focal_first", [True, False])
@pytest.mark.parametrize("world_frame", ["first", "focal"])
def test_written_cameras_are_the_true_relative_poses(oracle_run, world_frame, focal_first):
    samples, calls = oracle_run(world_frame=world_frame, focal_first=focal_first, conf_percentile=0, max_points=ALL)
    for sample in samples:
        anchor = anchor_frame(sample)
        S = len(sample.window_frame_indices)
        assert sample.world_frame == world_frame
        assert sample.window_extrinsics.shape == (S, 3, 4)
        err = np.abs(sample.extrinsic.double().numpy() - true_relative(sample.frame_index, anchor)).max()
        assert err < 1e-4
        for k, frame in enumerate(sample.window_frame_indices):
            err = np.abs(sample.window_extrinsics[k].double().numpy() - true_relative(frame, anchor)).max()
            assert err < 1e-4, (k, frame)
        assert torch.equal(sample.extrinsic, sample.window_extrinsics[S // 2])
        assert torch.equal(sample.intrinsic, sample.window_intrinsics[S // 2])
        # the world camera itself is the identity
        at = 0 if world_frame == "first" else S // 2
        assert torch.allclose(sample.window_extrinsics[at], torch.eye(3, 4), atol=1e-6)
    # what the model was fed: focal frame first (VGGT's reference) or plain time order
    (seen,) = calls
    for sample, indices in zip(samples, seen):
        expected = list(sample.window_frame_indices)
        if focal_first:
            expected.remove(sample.frame_index)
            expected.insert(0, sample.frame_index)
        assert indices == expected


@pytest.mark.parametrize("config", [
    dict(conf_percentile=0, max_points=ALL),
    dict(),  # defaults: confidence filter and cap on
    dict(world_frame="focal", focal_first=False, conf_percentile=40, max_points=7_000),
], ids=["all", "defaults", "focal-filtered-capped"])
def test_every_point_lies_on_the_scene_surfaces(oracle_run, config):
    samples, _ = oracle_run(**config)
    for sample in samples:
        assert sample.points.dtype == torch.float32 and sample.points.shape[1] == 6
        distance = oracle_backend.scene_distance_to_surfaces(to_scene_world(sample.points[:, :3], anchor_frame(sample)))
        assert distance.max() < 1e-4


@pytest.mark.parametrize("world_frame", ["first", "focal"])
def test_focal_first_changes_nothing_written(oracle_run, world_frame):
    first, _ = oracle_run(world_frame=world_frame, focal_first=True)
    timeorder, _ = oracle_run(world_frame=world_frame, focal_first=False)
    for a, b in zip(first, timeorder):
        assert_samples_close(a, b, rtol=1e-5, atol=1e-5)


def test_scale_of_the_model_is_kept(oracle_run):
    """VGGT is up to scale per window: the tool writes the model's scale, never rescales."""
    unit, _ = oracle_run(conf_percentile=0, max_points=ALL)
    scaled, _ = oracle_run(scale=2.5, conf_percentile=0, max_points=ALL)
    for a, b in zip(unit, scaled):
        assert torch.allclose(b.depth, 2.5 * a.depth, rtol=1e-5)
        assert torch.allclose(b.window_extrinsics[..., :3], a.window_extrinsics[..., :3], atol=1e-6)
        assert torch.allclose(b.window_extrinsics[..., 3], 2.5 * a.window_extrinsics[..., 3], rtol=1e-5, atol=1e-6)
        assert torch.equal(b.window_intrinsics, a.window_intrinsics)
        assert torch.allclose(b.points[:, :3], 2.5 * a.points[:, :3], rtol=1e-5, atol=1e-5)
        assert torch.equal(b.points[:, 3:], a.points[:, 3:])


# ============================================================================= 4. filter and cap: exact and deterministic


def oracle_conf(S: int, H: int, W: int) -> torch.Tensor:
    """The oracle's depth_conf of one window, flat in (s, v, u) order."""
    return torch.from_numpy(oracle_backend._confidence(H, W)).expand(S, H, W).reshape(-1)


@pytest.mark.parametrize("percentile", [10, 25, 60])
def test_confidence_percentile_keeps_exactly_the_confident_pixels(oracle_run, scene_windows, percentile):
    everything, _ = oracle_run(conf_percentile=0, max_points=ALL)
    filtered, _ = oracle_run(conf_percentile=percentile, max_points=ALL)
    for full, kept in zip(everything, filtered):
        S, (H, W) = len(full.window_frame_indices), full.depth.shape
        conf = oracle_conf(S, H, W)
        sample = conf[:: streaming_vggt.PERCENTILE_STRIDE]  # the threshold is the sample's exact percentile
        threshold = sample.sort().values[max(1, round(sample.numel() * percentile / 100)) - 1]
        mask = conf >= threshold
        assert torch.equal(kept.points, full.points[mask])  # the same points, same order
        dropped = 1 - kept.points.shape[0] / full.points.shape[0]
        # the sample's percentile is the window's within a few standard errors (ties: the oracle's
        # confidence is symmetric and equal in all S frames)
        assert abs(dropped - percentile / 100) < 5e-3
        assert kept.quality["kept_fraction"] == pytest.approx(mask.float().mean().item(), abs=1e-6)


def test_min_conf_drops_points_below_it(oracle_run):
    everything, _ = oracle_run(conf_percentile=0, max_points=ALL)
    kept, _ = oracle_run(conf_percentile=0, min_conf=3.5, max_points=ALL)
    for full, sample in zip(everything, kept):
        S, (H, W) = len(full.window_frame_indices), full.depth.shape
        mask = oracle_conf(S, H, W) >= 3.5
        assert 0 < mask.sum() < mask.numel()
        assert torch.equal(sample.points, full.points[mask])


@pytest.mark.parametrize("max_points", [0, 1, 777, 20_000])
def test_cap_is_respected_and_samples_the_whole_window(oracle_run, scene_windows, max_points):
    everything, _ = oracle_run(conf_percentile=0, max_points=ALL)
    capped, _ = oracle_run(conf_percentile=30, max_points=max_points)
    for full, sample, window in zip(everything, capped, scene_windows):
        S, (H, W) = len(full.window_frame_indices), full.depth.shape
        conf = oracle_conf(S, H, W)
        sampled = conf[:: streaming_vggt.PERCENTILE_STRIDE]
        threshold = sampled.sort().values[round(sampled.numel() * 0.30) - 1]
        valid = int((conf >= threshold).sum())
        assert sample.points.shape == (min(max_points, valid), 6)
        if max_points == 0:
            continue
        index = locate_points(sample, window.frames)
        assert (index >= 0).all()  # every point found on its own pixel with its own colour
        assert torch.equal(sample.points, full.points[index])  # a subset of the uncapped points ...
        assert (index[1:] > index[:-1]).all()  # ... in flat (s, v, u) order, no repeats
        assert (conf[index] >= threshold).all()  # the cap only draws from what the filter kept
        if max_points >= 777:  # spread over the whole window, not the first rows / frames
            per_frame = torch.bincount(index // (H * W), minlength=S).float() / index.numel()
            assert (per_frame - 1 / S).abs().max() < 0.05
            rows = (index % (H * W)) // W
            assert rows.float().std() > 0.2 * H


def test_identical_bytes_across_runs(scene_windows):
    """Filter and cap depend on nothing but the data: two fresh runs write the same bytes."""
    config = GeometryConfig(conf_percentile=25, max_points=20_000)
    runs = [GeometryStage(oracle_backend.make("cpu"), "cpu", config)(scene_windows) for _ in range(2)]
    for a, b in zip(*runs):
        assert a.points.shape[0] == 20_000
        assert sample_bytes(a) == sample_bytes(b)


def test_cap_picks_the_same_points_whatever_the_batch(oracle_run, scene_windows):
    config = dict(conf_percentile=25, max_points=20_000)
    (_, second_in_pair), _ = oracle_run(batch=(0, 1), **config)
    (alone,), _ = oracle_run(batch=(1,), **config)
    (first_in_pair, _), _ = oracle_run(batch=(1, 0), **config)
    for other in (alone, first_in_pair):
        assert torch.equal(locate_points(other, scene_windows[1].frames), locate_points(second_in_pair, scene_windows[1].frames))
        assert torch.equal(other.points[:, 3:], second_in_pair.points[:, 3:])
        assert_samples_close(other, second_in_pair, rtol=1e-6, atol=1e-6)


def test_samples_own_their_tensors(oracle_run):
    """A Sample must not pin the whole batch: torch.save of one sample's tensors writes only it."""
    samples, _ = oracle_run(conf_percentile=25, max_points=5_000)
    for s in samples:
        for name in ("points", "extrinsic", "intrinsic", "window_extrinsics", "window_intrinsics"):
            t = getattr(s, name)
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


class BrokenCameraModel:
    """A seam model whose frame 1 has an unusable camera (infinite focal length, as a random VGGT
    predicts for fov = 0) and whose frame 2 has a few non-finite / non-positive depths."""

    def __call__(self, frames):
        B, S, _, H, W = frames.shape
        depth = torch.full((B, S, H, W), 2.0)
        depth[:, 2, 0, :3] = torch.tensor([float("nan"), float("inf"), -1.0])
        K = torch.tensor([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]]).expand(B, S, 3, 3).clone()
        K[:, 1, 1, 1] = float("inf")
        return {"depth": depth, "depth_conf": torch.ones(B, S, H, W), "extrinsic": torch.eye(3, 4).expand(B, S, 3, 4),
                "intrinsic": K}


def test_non_finite_predictions_never_reach_the_points(scene_windows):
    window = scene_windows[0]
    S, H, W, _ = window.frames.shape
    (sample,) = GeometryStage(BrokenCameraModel(), "cpu", GeometryConfig(conf_percentile=0, max_points=ALL))([window])
    assert torch.isfinite(sample.points).all()
    assert sample.points.shape[0] == (S - 1) * H * W - 3  # frame 1: none; frame 2: all but 3 pixels
    assert sample.quality["kept_fraction"] == pytest.approx(((S - 1) * H * W - 3) / (S * H * W))


def test_negative_max_points_is_refused():
    with pytest.raises(ValueError, match="max_points"):
        GeometryStage(oracle_backend.make("cpu"), "cpu", GeometryConfig(max_points=-1))


# ============================================================================= 5. the backend seam


def test_load_backend_vggt_is_make_vggt():
    assert load_backend("vggt") is make_vggt


@pytest.mark.parametrize("spec", ["oracle_backend:make", "tests.oracle_backend:make"])
def test_load_backend_module_function(spec, scene_windows):
    factory = load_backend(spec)
    assert callable(factory)
    model = factory("cpu")
    (sample,) = GeometryStage(model, "cpu", GeometryConfig(max_points=100))(scene_windows[:1])
    assert sample.points.shape == (100, 6)


@pytest.mark.parametrize("spec, message", [
    ("", "module:function"),
    ("oracle_backend", "module:function"),
    (":make", "module:function"),
    ("oracle_backend:", "module:function"),
    ("no_such_module_4711:make", "cannot import module 'no_such_module_4711'"),
    ("oracle_backend:no_such_factory", "no callable 'no_such_factory'"),
    ("oracle_backend:ROOM_LO", "no callable 'ROOM_LO'"),
])
def test_load_backend_bad_specs(spec, message):
    with pytest.raises(ValueError, match="--backend") as info:
        load_backend(spec)
    assert message in str(info.value)


def test_missing_vggt_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "vggt" or n.startswith("vggt.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "vggt", None)
    with pytest.raises(ImportError, match="pip install git\\+https://github.com/facebookresearch/vggt"):
        make_vggt("cpu")
    with pytest.raises(ImportError, match="pip install"):
        load_backend("vggt")("cpu", model="/nonexistent/checkpoint.pt")


# ============================================================================= 1. tiny VGGT, real code path (needs vggt)


def tiny_network(seed: int = 0) -> torch.nn.Module:
    """tests/tiny_vggt.py's network (field-of-view outputs pushed positive: finite cameras)."""
    from tiny_vggt import tiny_vggt

    return tiny_vggt(seed=seed)


@pytest.fixture(scope="module")
def tiny_model():
    pytest.importorskip("vggt")
    return make_vggt("cpu", network=tiny_network())


@pytest.fixture(scope="module")
def tiny_windows(tmp_path_factory):
    # 192x56 -> model grid 518x154 (width 518, height round(151.1 / 14) * 14): small, so fast
    path = videos.write_mp4(tmp_path_factory.mktemp("tiny") / "gradient.mp4", num_frames=9, width=192, height=56)
    source = FrameSource(str(path))
    windows = list(source.windows(kernel=3, stride=2, dilation=2))
    source.close()
    assert [w.window.frame_indices for w in windows] == [(0, 2, 4), (2, 4, 6), (4, 6, 8)]
    return windows


@pytest.mark.parametrize("world_frame", ["first", "focal"])
def test_tiny_vggt_samples_are_as_documented(tiny_model, tiny_windows, world_frame):
    max_points = 15_000
    samples = GeometryStage(tiny_model, "cpu", GeometryConfig(world_frame=world_frame, max_points=max_points))(tiny_windows[:2])
    assert len(samples) == 2
    for sample, window in zip(samples, tiny_windows):
        S, H, W = 3, 154, 518
        assert isinstance(sample, Sample)
        assert sample.video == window.video and sample.world_frame == world_frame
        assert sample.frame_index == window.window.focal_frame == sample.window_frame_indices[S // 2]
        assert sample.window_frame_indices == list(window.window.frame_indices)
        assert all(type(i) is int for i in sample.window_frame_indices)
        assert sample.window_timestamps == list(window.timestamps)
        assert sample.timestamp == window.timestamps[S // 2] == pytest.approx(sample.frame_index / 30)
        assert sample.fps == pytest.approx(30) and sample.dilation == 2
        assert sample.rgb.dtype == torch.uint8 and sample.rgb.shape == (H, W, 3)
        assert torch.equal(sample.rgb, window.frames[S // 2])
        for name, shape in [("depth", (H, W)), ("extrinsic", (3, 4)), ("intrinsic", (3, 3)),
                            ("window_extrinsics", (S, 3, 4)), ("window_intrinsics", (S, 3, 3))]:
            t = getattr(sample, name)
            assert t.dtype == torch.float32 and t.shape == shape and t.device.type == "cpu", name
            assert torch.isfinite(t).all(), name
        assert (sample.depth > 0).all()
        assert sample.points.dtype == torch.float32 and sample.points.ndim == 2 and sample.points.shape[1] == 6
        assert 0 < sample.points.shape[0] <= max_points
        assert torch.isfinite(sample.points).all()
        assert sample.points[:, 3:].min() >= 0 and sample.points[:, 3:].max() <= 1
        assert torch.equal(sample.extrinsic, sample.window_extrinsics[S // 2])
        assert torch.equal(sample.intrinsic, sample.window_intrinsics[S // 2])
        R = sample.window_extrinsics[..., :3].double()
        assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(S, 3, 3), atol=1e-5)
        at = 0 if world_frame == "first" else S // 2
        assert torch.allclose(sample.window_extrinsics[at], torch.eye(3, 4), atol=1e-5)
        assert set(sample.quality) == {"conf_p10", "conf_p50", "conf_p90", "kept_fraction", "depth_min", "depth_max"}
        assert all(isinstance(v, float) for v in sample.quality.values())
        assert sample.quality["depth_min"] == pytest.approx(sample.depth.min().item())
        assert sample.quality["depth_max"] == pytest.approx(sample.depth.max().item())
        assert 0.7 < sample.quality["kept_fraction"] <= 0.76  # default filter: lowest 25% dropped
        # what the writer makes of it loads with weights_only
        files = sample_bytes(sample)
        camera = torch.load(io.BytesIO(files[".camera.pt"]), weights_only=True)
        points = torch.load(io.BytesIO(files[".points.pt"]), weights_only=True)
        assert torch.equal(camera["extrinsic"], sample.extrinsic) and torch.equal(points, sample.points)


@pytest.mark.parametrize("world_frame", ["first", "focal"])
def test_tiny_vggt_batch_of_two_equals_two_batches_of_one(tiny_model, tiny_windows, world_frame):
    """No confidence filter here: VGGT's confidences may differ in the last bit between batch
    sizes on some CPUs, which would move single points across the threshold. The cap is on."""
    stage = GeometryStage(tiny_model, "cpu", GeometryConfig(world_frame=world_frame, conf_percentile=0, max_points=10_000))
    together = stage(tiny_windows[:2])
    alone = stage(tiny_windows[:1]) + stage(tiny_windows[1:2])
    for a, b in zip(together, alone):
        assert a.points.shape == (10_000, 6)
        assert_samples_close(a, b, rtol=1e-5, atol=1e-5)


def test_tiny_vggt_batching_with_the_default_filter(tiny_model, tiny_windows):
    stage = GeometryStage(tiny_model, "cpu", GeometryConfig())
    together = stage(tiny_windows[:2])
    alone = stage(tiny_windows[:1]) + stage(tiny_windows[1:2])
    try:
        for a, b in zip(together, alone):
            assert_samples_close(a, b, rtol=1e-5, atol=1e-5)
    except AssertionError:
        frames = torch.stack([w.frames for w in tiny_windows[:2]])
        conf_together = stage.predict(frames)["depth_conf"]
        conf_alone = torch.cat([stage.predict(frames[i : i + 1])["depth_conf"] for i in range(2)])
        if torch.equal(conf_together, conf_alone):
            raise  # same confidences, different samples: a real difference
        pytest.skip("depth_conf differs in the last bit between batch sizes on this CPU: points near "
                    "the threshold may flip (the unfiltered case above covers batching)")


def test_tiny_vggt_focal_points_reproject(tiny_model, tiny_windows):
    """Whatever the model predicts, the written camera and depth describe the written points."""
    (sample,) = GeometryStage(tiny_model, "cpu", GeometryConfig(conf_percentile=0, max_points=ALL))(tiny_windows[:1])
    S, (H, W) = 3, sample.depth.shape
    assert sample.points.shape == (S * H * W, 6)
    focal = sample.points.reshape(S, H, W, 6)[S // 2]
    uv, z = project(focal[..., :3], sample.extrinsic, sample.intrinsic)
    assert (uv - pixel_grid(H, W)).norm(dim=-1).max() < 0.05
    assert torch.allclose(z, sample.depth.double(), rtol=1e-4, atol=0)


def test_tiny_vggt_runs_are_byte_identical(tiny_windows):
    pytest.importorskip("vggt")
    runs = [GeometryStage(make_vggt("cpu", network=tiny_network()), "cpu", GeometryConfig())(tiny_windows[1:2])
            for _ in range(2)]
    for a, b in zip(*runs):
        assert sample_bytes(a) == sample_bytes(b)


# ============================================================================= 2. checkpoints (needs vggt)


def tiny_with_heads(seed: int) -> torch.nn.Module:
    """A tiny VGGT that also has (small) point and track heads, like a full VGGT() checkpoint."""
    from vggt.heads.dpt_head import DPTHead
    from vggt.heads.track_head import TrackHead

    net = tiny_network(seed)
    net.point_head = DPTHead(dim_in=64, output_dim=4, activation="inv_log", conf_activation="expp1", features=16,
                             out_channels=[8, 16, 32, 32], intermediate_layer_idx=[0, 0, 1, 1])
    net.track_head = TrackHead(dim_in=64, features=8, hidden_size=16, corr_levels=2, corr_radius=1)
    return net


def save_checkpoint(state_dict: dict, fmt: str, directory) -> str:
    """fmt: pt | pt-wrapped ({'model': state_dict}) | safetensors | folder-safetensors | folder-pt."""
    from safetensors.torch import save_file

    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    os.makedirs(directory, exist_ok=True)
    if fmt == "pt":
        path = os.path.join(directory, "weights.pt")
        torch.save(state_dict, path)
    elif fmt == "pt-wrapped":
        path = os.path.join(directory, "checkpoint.pth")
        torch.save({"model": state_dict}, path)
    elif fmt == "safetensors":
        path = os.path.join(directory, "weights.safetensors")
        save_file(state_dict, path)
    elif fmt == "folder-safetensors":
        save_file(state_dict, os.path.join(directory, "model.safetensors"))
        path = directory
    elif fmt == "folder-pt":
        torch.save(state_dict, os.path.join(directory, "model.pt"))
        path = directory
    else:
        raise ValueError(fmt)
    return str(path)


@pytest.fixture(scope="module")
def source_state_dicts():
    pytest.importorskip("vggt")
    return {
        "without-heads": tiny_network(seed=1).state_dict(),
        "with-heads": tiny_with_heads(seed=1).state_dict(),
    }


@pytest.mark.parametrize("fmt", ["pt", "pt-wrapped", "safetensors", "folder-safetensors", "folder-pt"])
@pytest.mark.parametrize("heads", ["without-heads", "with-heads"])
def test_checkpoint_loads(source_state_dicts, tmp_path, fmt, heads):
    source = source_state_dicts[heads]
    assert any(k.startswith("point_head.") for k in source) == (heads == "with-heads")
    assert any(k.startswith("track_head.") for k in source) == (heads == "with-heads")
    path = save_checkpoint(source, fmt, tmp_path / "ckpt")
    target = tiny_network(seed=0)  # same architecture, other weights, no point/track heads
    assert not torch.equal(target.state_dict()["depth_head.scratch.output_conv2.2.weight"],
                           source["depth_head.scratch.output_conv2.2.weight"])
    load_vggt_state_dict(target, path)
    loaded = target.state_dict()
    assert set(loaded) == {k for k in source if not k.startswith(("point_head.", "track_head."))}
    for k, v in loaded.items():
        assert torch.equal(v, source[k]), k
    # and the loaded network runs behind the seam
    model = streaming_vggt.VGGTModel(target, torch.device("cpu"))
    with torch.inference_mode():
        out = model(torch.rand(1, 2, 3, 28, 42))
    assert out["depth"].shape == (1, 2, 28, 42) and out["extrinsic"].shape == (1, 2, 3, 4)


@pytest.mark.parametrize("drop", ["camera_head.pose_branch.fc2.bias", "aggregator.camera_token"])
def test_checkpoint_missing_a_key_fails(source_state_dicts, tmp_path, drop):
    source = dict(source_state_dicts["with-heads"])
    del source[drop]
    path = save_checkpoint(source, "pt", tmp_path)
    with pytest.raises(ValueError, match="1 missing keys") as info:
        load_vggt_state_dict(tiny_network(seed=0), path)
    assert drop in str(info.value)


def test_checkpoint_missing_a_whole_head_fails(source_state_dicts, tmp_path):
    source = {k: v for k, v in source_state_dicts["without-heads"].items() if not k.startswith("depth_head.")}
    path = save_checkpoint(source, "safetensors", tmp_path)
    with pytest.raises(ValueError, match="missing keys.*depth_head"):
        load_vggt_state_dict(tiny_network(seed=0), path)


@pytest.mark.parametrize("extra", ["aggregator.not_a_layer.weight", "head.weight", "depth_head_v2.bias"])
def test_checkpoint_with_unknown_keys_fails(source_state_dicts, tmp_path, extra):
    source = dict(source_state_dicts["with-heads"])
    source[extra] = torch.zeros(3)
    path = save_checkpoint(source, "pt", tmp_path)
    with pytest.raises(ValueError, match="1 unexpected keys") as info:
        load_vggt_state_dict(tiny_network(seed=0), path)
    assert extra in str(info.value)


def test_checkpoint_of_another_architecture_fails(tmp_path):
    pytest.importorskip("vggt")
    from tiny_vggt import tiny_vggt

    path = save_checkpoint(tiny_vggt(embed_dim=48, seed=1).state_dict(), "pt", tmp_path)
    with pytest.raises((ValueError, RuntimeError), match="size mismatch"):
        load_vggt_state_dict(tiny_network(seed=0), path)


def test_checkpoint_path_that_is_not_there(tmp_path):
    pytest.importorskip("vggt")
    with pytest.raises(CheckpointError, match="argument --model: folder .* holds none of"):
        load_vggt_state_dict(tiny_network(seed=0), str(tmp_path))  # an empty folder
    with pytest.raises(CheckpointError, match="argument --model: no such file or folder"):  # no network access
        load_vggt_state_dict(tiny_network(seed=0), str(tmp_path / "missing" / "model.pt"))


@contextlib.contextmanager
def _skip_weight_init():
    """Build modules without filling their weights (torch.empty, untouched pages): the full
    VGGT() is only needed for the names and shapes of its state dict."""
    import vggt.layers.vision_transformer as vit

    def identity(tensor, *args, **kwargs):
        return tensor

    names = ["kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_", "zeros_", "ones_",
             "constant_", "xavier_uniform_"]
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(torch.nn.init, name, identity))
        stack.enter_context(mock.patch.object(vit, "trunc_normal_", identity))
        yield


@pytest.mark.slow
def test_full_size_checkpoint_through_make_vggt(tmp_path):
    """--model PATH with a state dict of a full VGGT() (point and track heads included) loads into
    the tool's VGGT(enable_point=False, enable_track=False). Each tensor is stored as one
    broadcast constant (distinct per key), so the file is small but names and shapes are real.
    Measured on 2 CPU cores: ~20 s, peak RSS ~4.8 GB (the network itself)."""
    pytest.importorskip("vggt")
    psutil = pytest.importorskip("psutil")
    if psutil.virtual_memory().available < 7 * 2**30:
        pytest.skip("needs ~5 GB of free RAM")
    from vggt.models.vggt import VGGT

    with _skip_weight_init():
        full = VGGT()
    shapes = {k: (v.shape, v.dtype) for k, v in full.state_dict().items()}
    del full
    assert any(k.startswith("point_head.") for k in shapes) and any(k.startswith("track_head.") for k in shapes)
    values = {k: float(i % 1000) / 7 for i, k in enumerate(shapes)}
    state_dict = {k: torch.tensor(values[k], dtype=dtype).expand(shape) for k, (shape, dtype) in shapes.items()}
    path = tmp_path / "vggt_full.pt"
    torch.save(state_dict, path)
    del state_dict

    model = make_vggt("cpu", model=str(path))
    network = model.network
    assert network.point_head is None and network.track_head is None
    loaded = network.state_dict()
    assert set(loaded) == {k for k in shapes if not k.startswith(("point_head.", "track_head."))}
    keys = sorted(loaded)
    for k in keys[:: max(1, len(keys) // 40)] + keys[-3:]:
        assert loaded[k].shape == shapes[k][0]
        assert (loaded[k] == torch.tensor(values[k], dtype=loaded[k].dtype)).all(), k


# ============================================================================= batch-wide post-processing, GPU paths


@pytest.mark.parametrize("config", [
    dict(conf_percentile=25, max_points=20_000),
    dict(conf_percentile=0, max_points=ALL),
    dict(conf_percentile=40, min_conf=2.0, max_points=777),
    dict(conf_percentile=25, max_points=0),
])
def test_device_path_selects_the_same_points_as_the_host_path(scene_windows, config):
    """The CUDA code path (static shapes, no host sync) run on the CPU gives the host path's
    samples: same pixels, same order, same quality figures."""
    host = GeometryStage(oracle_backend.make("cpu"), "cpu", GeometryConfig(**config))
    device = GeometryStage(oracle_backend.make("cpu"), "cpu", GeometryConfig(**config))
    device.select_points = device._select_on_device  # what CUDA runs
    for a, b in zip(host(scene_windows), device(scene_windows)):
        assert_samples_close(a, b, rtol=1e-6, atol=1e-5)
        assert torch.equal(a.points[:, 3:], b.points[:, 3:])


@pytest.mark.parametrize("focal_first", [True, False])
def test_the_model_sees_every_frame_divided_by_255_in_its_input_order(focal_first):
    """The model input of the CPU path (a reused buffer, filled frame by frame) is exactly what
    the seam promises: float32 [B, S, 3, H, W], frames / 255, in input_order (SPEC)."""
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 256, (5, 28, 42, 3), dtype=torch.uint8, generator=generator) for _ in range(2)]
    seen = []

    def model(x):
        seen.append(x.clone())
        B, S, _, H, W = x.shape
        intrinsic = torch.tensor([[30.0, 0, 20], [0, 30, 13], [0, 0, 1]]).expand(B, S, 3, 3)
        return {"depth": torch.ones(B, S, H, W), "depth_conf": torch.ones(B, S, H, W),
                "extrinsic": torch.eye(3, 4).expand(B, S, 3, 4), "intrinsic": intrinsic}

    stage = GeometryStage(model, "cpu", GeometryConfig(focal_first=focal_first))
    for batch in (windows, windows[:1], windows):  # the buffer is remade and reused
        stage.predict(batch)
        order = stage.input_order(5)
        expected = torch.stack([w[order] for w in batch]).permute(0, 1, 4, 2, 3).float() / 255
        assert seen[-1].dtype == torch.float32 and torch.equal(seen[-1], expected)


@pytest.mark.parametrize("case", ["uniform", "constant", "few values", "two values", "heavy tail", "some NaN",
                                  "mostly NaN", "sorted", "small"])
def test_kth_smallest_on_the_host_is_torch_kthvalue(case):
    """The host path's bracketed selection gives exactly torch.kthvalue's value (NaN last), for
    ties, constant maps, NaN and skewed spreads alike."""
    rng = np.random.default_rng(0)
    n = 5 * 294 * 518 if case != "small" else 1000
    values = {
        "uniform": lambda: rng.random(n, dtype=np.float32) * 5 + 1,
        "constant": lambda: np.ones(n, np.float32),
        "few values": lambda: (1 + (np.arange(n) % 17) / 4).astype(np.float32),
        "two values": lambda: np.where(rng.random(n) < 0.25, 1.0, 2.0).astype(np.float32),
        "heavy tail": lambda: np.exp(rng.normal(0, 3, n)).astype(np.float32),
        "some NaN": lambda: np.where(rng.random(n) < 0.3, np.nan, rng.random(n)).astype(np.float32),
        "mostly NaN": lambda: np.where(rng.random(n) < 0.9, np.nan, rng.random(n)).astype(np.float32),
        "sorted": lambda: np.sort(rng.random(n, dtype=np.float32)),
        "small": lambda: rng.random(n, dtype=np.float32),
    }[case]()
    for k in (1, 7, n // 10, n // 4, n // 2, n - 3, n):
        want = torch.from_numpy(values).kthvalue(k).values.item()
        got = streaming_vggt._kth_smallest_np(values, k)
        assert got == want or (np.isnan(got) and np.isnan(want)), (k, got, want)


@pytest.mark.parametrize("seed, n, count, fraction", [
    (0, 5 * 60 * 80, 2_000, 0.6), (1, 5 * 60 * 80, 2_000, 0.6), (123_456, 5 * 60 * 80, 2_000, 0.6),
    (761_559, 5 * 60 * 80, 2_000, 0.6),
    # past the smallest sorted prefix (2^16 steps): several prefix tables, a walk that wraps
    (761_559, 5 * 294 * 518, 50_000, 0.75), (5, 5 * 294 * 518, 50_000, 0.1), (9, 300_001, 60_000, 0.99)])
def test_point_cap_takes_the_first_valid_pixels_of_the_walk(seed, n, count, fraction):
    """PointKeys.first_valid (rotated mask, prefix of the walk) = the valid pixels with the
    smallest keys, found the slow way from PointKeys.keys."""
    rng = np.random.default_rng(seed)
    keys = streaming_vggt.PointKeys(n)
    valid = rng.random(n) < fraction
    want = torch.where(torch.from_numpy(valid), keys.keys(torch.tensor([seed]), torch.device("cpu"))[0], n + keys.n)
    want = np.sort(want.topk(count, largest=False).indices.numpy())
    got = keys.first_valid(valid, int(valid.sum()), seed, count)
    assert got.dtype == np.int64 and np.array_equal(got, want)


def test_post_processing_syncs_the_host_once_per_batch(scene_windows, monkeypatch):
    """On CUDA the only waits are in _to_host (one per batch): the device path calls nothing that
    reads a device value on the host (item, tolist, nonzero, bool(), int())."""
    stage = GeometryStage(oracle_backend.make("cpu"), "cpu", GeometryConfig(conf_percentile=25, max_points=5_000))
    out = stage.predict(torch.stack([w.frames for w in scene_windows]))
    stage._keys(out["depth"][0].numel())  # the key table is built on the host once per window size
    reads = []
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    with torch.inference_mode():
        selection = stage._select_on_device(out, [1, 2])
        stage.assemble_points(out, selection)
        quality = stage.quality_figures(out, selection)
    monkeypatch.undo()
    assert reads == [], reads
    assert quality.shape == (2, 6)


def test_prepare_vggt_changes_no_output_and_reads_no_position_maximum(monkeypatch):
    """The RoPE table length comes from the patch grid (no int(positions.max()) host sync), and
    layer outputs no head reads are dropped: outputs are bit-identical."""
    pytest.importorskip("vggt")
    import copy

    from tiny_vggt import tiny_vggt

    net = tiny_vggt(depth=4)
    net.depth_head.intermediate_layer_idx = [0, 1, 3, 3]  # layer 2 is read by no head
    frames = torch.rand(2, 3, 3, 28 * 3, 28 * 4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = net(frames)
        patched = streaming_vggt.prepare_vggt(copy.deepcopy(net))
        lengths = []
        table = patched.aggregator.rope._compute_frequency_components
        patched.aggregator.rope._compute_frequency_components = lambda dim, n, *a: (lengths.append(n), table(dim, n, *a))[1]
        monkeypatch.setattr(torch.Tensor, "max", lambda *a, **k: pytest.fail("positions.max() was called"))
        out = patched(frames)
        monkeypatch.undo()
    for key in ("depth", "depth_conf", "pose_enc"):
        assert torch.equal(reference[key], out[key]), key
    assert set(lengths) == {8 + 1}  # a 6x8 patch grid (84x112 pixels), shifted by one for the special tokens


def test_auto_batch_size_grows_with_memory_and_shrinks_with_the_window():
    from streaming_vggt import AUTO_BATCH_MAX, auto_batch_size

    gib = 2**30
    assert auto_batch_size(5, 294, 518, 1 * gib) == 1  # never below one
    assert auto_batch_size(5, 294, 518, 200 * gib) == AUTO_BATCH_MAX
    h100 = auto_batch_size(5, 294, 518, 40 * gib)
    assert 8 <= h100 <= AUTO_BATCH_MAX
    assert auto_batch_size(15, 294, 518, 40 * gib) < h100 and auto_batch_size(5, 518, 518, 40 * gib) < h100
    assert auto_batch_size(5, 294, 518, 20 * gib) < auto_batch_size(5, 294, 518, 40 * gib)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 19_061])
def test_host_quantiles_match_torch_quantile(n):
    """_quantiles_np (order statistics put in place by a partition) = torch.quantile's linear
    interpolation, NaN rows included (torch gives NaN for a row holding one)."""
    rng = np.random.default_rng(n)
    rows = [rng.random(n, dtype=np.float32), np.round(rng.random(n, dtype=np.float32) * 4).astype(np.float32),
            rng.random(n, dtype=np.float32)]
    rows[2][rng.integers(n)] = np.nan
    values = torch.from_numpy(np.stack(rows))
    q = streaming_vggt.QUALITY_QUANTILES
    got = streaming_vggt._quantiles_np(values, q)
    want = torch.quantile(values, torch.tensor(q, dtype=torch.float32), dim=1).T
    assert got.dtype == torch.float32 and got.shape == (3, len(q))
    assert torch.isnan(got[2]).all() and torch.isnan(want[2]).all()
    torch.testing.assert_close(got[:2], want[:2], rtol=0, atol=1e-6)
