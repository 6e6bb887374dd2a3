"""Preprocessing recipes: output shapes and ranges, orientation/geometry, round-trip, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from molre.data.dicomio import write_ct_series
from molre.data.preprocess import Recipe, make_recipe
from molre.data.volume import SeriesVolume, read_series

# patient LPS position (mm) of a marker placed left (+x), posterior (+y) and superior (+z)
MARKER_LPS = np.array([30.0, 20.0, 110.0])


def _phantom(
    direction: np.ndarray, origin: np.ndarray, shape=(30, 60, 70), spacing=(5.0, 2.0, 2.0)
) -> SeriesVolume:
    """Water ellipse + a 1500 HU marker at MARKER_LPS, sampled on the given grid."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    idx = np.stack([z, y, x], -1).astype(np.float64)
    axes = np.stack([direction[2], direction[1], direction[0]])  # array axis k, j, i in LPS
    world = origin + (idx * np.asarray(spacing)) @ axes
    hu = np.full(shape, -1000.0, np.float32)
    head = ((world[..., 0] / 55) ** 2 + ((world[..., 1] - 10) / 50) ** 2) < 1
    hu[head] = 30.0
    marker = np.all(np.abs(world - MARKER_LPS) <= [2.0, 2.0, 2.5], axis=-1)
    hu[marker] = 1500.0
    assert marker.sum() >= 4
    return SeriesVolume(hu, tuple(spacing), origin, direction, [], "1.2.3", "1.2")


def _standard() -> SeriesVolume:
    return _phantom(np.eye(3), np.array([-69.0, -50.0, 0.0]))


def _flipped() -> SeriesVolume:
    # same anatomy, stored with x -> patient right, y -> anterior and slices feet-first
    d = np.diag([-1.0, -1.0, -1.0])
    return _phantom(d, np.array([69.0, 68.0, 145.0]))


def test_ctfm_3d_shape_range_and_marker_position() -> None:
    recipe = make_recipe("ctfm-3d", spacing=(5, 4, 4), roi=(32, 64, 64))
    vol = _standard()
    out = recipe(vol)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == recipe.output_shape() == (1, 32, 64, 64)
    assert float(out.min()) == 0.0 and 0.5 < float(out.max()) <= 1.0
    # air (-1000 HU) maps close to 0, water (30 HU) to (30 + 1024) / 3072
    assert float(out[0, 16, 32, 32]) == pytest.approx(1054 / 3072, abs=1e-3)
    # SPL: the superior/posterior/left marker sits at high indices on every axis
    peak = np.unravel_index(int(out.argmax()), tuple(out.shape))[1:]
    assert peak[0] > 16 and peak[1] > 32 and peak[2] > 32
    # and the output affine maps it back to where it is in the patient
    meta = recipe.transform_meta(vol)
    ras = meta.affine.numpy() @ np.array([*peak, 1.0])
    lps = ras[:3] * np.array([-1, -1, 1])
    assert np.all(np.abs(lps - MARKER_LPS) <= np.array([4.0, 4.0, 5.0]))


def test_orientation_makes_differently_stored_scans_identical() -> None:
    recipe = make_recipe("ctfm-3d", spacing=(5, 4, 4), roi=(32, 48, 48))
    a, b = recipe(_standard()), recipe(_flipped())
    assert not np.array_equal(_standard().hu, _flipped().hu)
    assert torch.allclose(a, b, atol=1e-4)
    r2 = make_recipe("slices-2d", n_slices=6, size=32, normalize=None)
    assert torch.allclose(r2(_standard()), r2(_flipped()), atol=1e-4)


def test_slices_2d_shape_windows_and_normalisation() -> None:
    vol = _standard()
    plain = make_recipe("slices-2d", n_slices=5, size=48, normalize=None)
    out = plain(vol)
    assert tuple(out.shape) == plain.output_shape() == (5, 3, 48, 48)
    assert float(out.min()) == 0.0 and float(out.max()) <= 1.0
    # water (30 HU) in the brain window 40/80 -> (30 - 0) / 80; subdural 75/215; bone 600/2800
    centre = out[2, :, 24, 24]
    assert torch.allclose(
        centre, torch.tensor([30 / 80, (30 + 32.5) / 215, (30 + 800) / 2800]), atol=1e-3
    )
    # the marker (left) appears on the image's right half, posterior -> lower half
    # (slices are sampled at z = 0, 7.25, 14.5, 21.75, 29; the marker is at z index 22)
    marker_slice = out[3, 2]
    assert float(marker_slice.max()) > 0.45  # water is (30 + 800) / 2800 = 0.30
    r, c = np.unravel_index(int(marker_slice.argmax()), tuple(marker_slice.shape))
    assert r > 24 and c > 24
    assert float(out[0, 2].max()) < 0.3  # no marker in the lowest slice
    imagenet = make_recipe("slices-2d", n_slices=5, size=48)(vol)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(imagenet, (out - mean) / std, atol=1e-5)


def test_recipe_on_a_real_dicom_series(tmp_path: Path) -> None:
    std = _standard()
    write_ct_series(tmp_path / "s", std.hu[::3], spacing=(15.0, 2.0, 2.0), origin=std.origin)
    vol = read_series(tmp_path / "s")
    out = make_recipe("ctfm-3d", spacing=(5, 4, 4), roi=(16, 32, 32))(vol)
    assert tuple(out.shape) == (1, 16, 32, 32) and 0.0 <= float(out.min()) < float(out.max()) <= 1


def test_round_trip_cache_key_and_aliases() -> None:
    r = make_recipe("slices-2d", slices=8, size=64)
    assert r.params["n_slices"] == 8
    d = r.to_dict()
    assert d["name"] == "slices-2d" and "slices" not in d
    again = Recipe.from_dict(d)
    assert again == r and again.cache_key() == r.cache_key()
    assert Recipe.from_dict({"name": "slices-2d", "params": {"n_slices": 8, "size": 64}}) == r
    assert make_recipe("slices-2d", n_slices=9, size=64).cache_key() != r.cache_key()
    c = make_recipe("ctfm-3d")
    assert c.params["spacing"] == [5.0, 2.0, 2.0] and c.params["roi"] == [48, 128, 128]
    assert c.params["hu_range"] == [-1024.0, 2048.0]
    assert Recipe.from_dict(c.to_dict()).cache_key() == c.cache_key() != r.cache_key()


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("nope", {}, "unknown preprocessing recipe 'nope'"),
        ("ctfm-3d", {"spacnig": [1, 1, 1]}, "unknown parameter 'spacnig'"),
        ("ctfm-3d", {"roi": [48, 128]}, "roi must be 3 positive numbers"),
        ("ctfm-3d", {"hu_range": [100, -100]}, "hu_range"),
        ("slices-2d", {"windows": [[40, 80]]}, "windows must be 3"),
        ("slices-2d", {"normalize": "zscore"}, "normalize must be null or one of"),
        ("slices-2d", {"orientation": "SPX"}, "orientation 'SPX'"),
    ],
)
def test_bad_recipes_raise_config_error(name: str, params: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        make_recipe(name, **params)
