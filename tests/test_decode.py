"""Decoding: targets -> dense maps -> decode gives the boxes back; peak mask, top-K, flip merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from centerx.data.targets import build_targets
from centerx.model.decode import decode, flip_merge, gather_cells, peak_mask, topk_peaks

pytestmark = pytest.mark.usefixtures("single_thread")

STRIDE = 4


def dense_maps(targets, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a perfect model would output: heatmap, and wh/offset scattered at each index."""
    height, width = grid
    wh = torch.zeros(1, 2, height * width)
    offset = torch.zeros(1, 2, height * width)
    real = targets.mask > 0
    index = torch.as_tensor(targets.index[real])
    wh[0, :, index] = torch.as_tensor(targets.wh[real]).T
    offset[0, :, index] = torch.as_tensor(targets.offset[real]).T
    heatmap = torch.as_tensor(targets.heatmap)[None]
    return heatmap, wh.view(1, 2, height, width), offset.view(1, 2, height, width)


@pytest.mark.parametrize("seed", range(4))
def test_decode_round_trip_recovers_boxes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image_w, image_h, num_classes = 160, 128, 3
    # Boxes in input pixels with well-separated centres (one object per cell).
    boxes, centres = [], set()
    while len(boxes) < 6:
        w, h = rng.uniform(6, 60, 2)
        cx, cy = rng.uniform(w / 2, image_w - w / 2), rng.uniform(h / 2, image_h - h / 2)
        cell = (int(cx // STRIDE), int(cy // STRIDE))
        if any(abs(cell[0] - x) < 2 and abs(cell[1] - y) < 2 for x, y in centres):
            continue
        centres.add(cell)
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    boxes = np.array(boxes)
    labels = rng.integers(0, num_classes, len(boxes))
    grid = (image_h // STRIDE, image_w // STRIDE)
    targets = build_targets(boxes / STRIDE, labels, num_classes, grid, max_objects=16)
    heatmap, wh, offset = dense_maps(targets, grid)

    out_boxes, scores, classes = decode(heatmap, wh, offset, k=len(boxes), stride=STRIDE)
    assert out_boxes.shape == (1, len(boxes), 4)
    assert scores.shape == classes.shape == (1, len(boxes))
    assert classes.dtype == torch.int64
    np.testing.assert_array_equal(scores[0].numpy(), 1.0)
    # Order of tied peaks is unspecified: match each original box to its decoded one.
    decoded = out_boxes[0].double().numpy()
    for box, label in zip(boxes, labels, strict=True):
        j = int(np.abs(decoded - box).sum(1).argmin())
        np.testing.assert_allclose(decoded[j], box, atol=1e-4, rtol=0)
        assert int(classes[0, j]) == label


def test_decode_by_hand_single_peak() -> None:
    heatmap = torch.zeros(1, 2, 4, 5)
    heatmap[0, 1, 2, 3] = 0.8
    heatmap[0, 0, 0, 0] = 0.3
    wh = torch.zeros(1, 2, 4, 5)
    offset = torch.zeros(1, 2, 4, 5)
    wh[0, :, 2, 3] = torch.tensor([2.0, 1.0])
    offset[0, :, 2, 3] = torch.tensor([0.5, 0.25])
    boxes, scores, classes = decode(heatmap, wh, offset, k=2, stride=4)
    # centre (3.5, 2.25) cells -> x 3.5 +- 1, y 2.25 +- 0.5, times 4.
    np.testing.assert_allclose(boxes[0, 0].numpy(), [10.0, 7.0, 18.0, 11.0])
    np.testing.assert_allclose(scores[0].numpy(), [0.8, 0.3])
    assert classes[0].tolist() == [1, 0]


def peak_mask_reference(scores: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Brute force: keep a value iff it equals the max of its (border-clipped) kxk window."""
    out = np.zeros_like(scores)
    half = kernel // 2
    batch, channels, height, width = scores.shape
    for b in range(batch):
        for c in range(channels):
            for y in range(height):
                for x in range(width):
                    window = scores[
                        b, c, max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1
                    ]
                    if scores[b, c, y, x] == window.max():
                        out[b, c, y, x] = scores[b, c, y, x]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["continuous", "plateaus", "negative"])
def test_peak_mask_matches_brute_force(dtype: torch.dtype, kind: str) -> None:
    gen = torch.Generator().manual_seed(len(kind))
    shape = (2, 3, 9, 11)
    if kind == "continuous":
        scores = torch.rand(shape, generator=gen)
    elif kind == "plateaus":
        scores = torch.randint(0, 3, shape, generator=gen).float() / 2  # many ties, zeros
    else:
        scores = -torch.randint(1, 4, shape, generator=gen).float()  # all negative, ties
    scores = scores.to(dtype)
    got = peak_mask(scores)
    assert got.dtype == dtype and got.shape == scores.shape
    expected = peak_mask_reference(scores.numpy())
    np.testing.assert_array_equal(got.numpy(), expected)
    # Sanity: the case really has ties that are kept and neighbours that are removed.
    kept = expected != 0
    assert kept.any() and (~kept & (scores.numpy() != 0)).any()


def test_peak_mask_keeps_plateau_and_suppresses_shoulders() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.2, 0.1, 0.0],
            [0.2, 0.9, 0.9, 0.1],
            [0.1, 0.3, 0.4, 0.0],
        ]
    ).view(1, 1, 3, 4)
    expected = torch.zeros_like(scores)
    expected[0, 0, 1, 1] = expected[0, 0, 1, 2] = 0.9
    assert torch.equal(peak_mask(scores), expected)


@pytest.mark.parametrize("shape,k", [((2, 3, 5, 7), 10), ((1, 1, 4, 4), 16), ((3, 4, 2, 9), 100)])
def test_topk_peaks_index_split(shape: tuple[int, ...], k: int) -> None:
    batch = shape[0]
    gen = torch.Generator().manual_seed(0)
    count = int(np.prod(shape[1:]))
    scores = torch.stack([torch.randperm(count, generator=gen) for _ in range(batch)]).float()
    scores = scores.view(shape) / count  # distinct values: a unique order
    top_scores, classes, ys, xs = topk_peaks(scores, k)
    k_eff = min(k, count)
    assert top_scores.shape == classes.shape == ys.shape == xs.shape == (batch, k_eff)
    for b in range(batch):
        flat = scores[b].numpy().ravel()
        order = np.argsort(-flat, kind="stable")[:k_eff]
        c, y, x = np.unravel_index(order, shape[1:])
        np.testing.assert_array_equal(classes[b].numpy(), c)
        np.testing.assert_array_equal(ys[b].numpy(), y)
        np.testing.assert_array_equal(xs[b].numpy(), x)
        np.testing.assert_array_equal(top_scores[b].numpy(), flat[order])


def test_gather_cells() -> None:
    feature = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    picked = gather_cells(feature, torch.tensor([[0, 5, 11]]))
    assert picked.tolist() == [[[0.0, 12.0], [5.0, 17.0], [11.0, 23.0]]]


def _maps(gen: torch.Generator, shape=(2, 3, 6, 8)) -> dict[str, torch.Tensor]:
    b, _, h, w = shape
    return {
        "heatmap": torch.rand(shape, generator=gen),
        "wh": torch.rand(b, 2, h, w, generator=gen) * 10,
        "offset": torch.rand(b, 2, h, w, generator=gen),
    }


def test_flip_merge_of_symmetric_input_is_identity() -> None:
    gen = torch.Generator().manual_seed(3)
    raw = _maps(gen)
    symmetric = {k: (v + v.flip(3)) / 2 for k, v in raw.items()}
    merged = flip_merge(symmetric, symmetric)
    for key in ("heatmap", "wh", "offset"):
        torch.testing.assert_close(merged[key], symmetric[key], rtol=0, atol=1e-7)


def test_flip_merge_unflips_and_averages() -> None:
    gen = torch.Generator().manual_seed(4)
    plain, other = _maps(gen), _maps(gen)
    # A perfectly flip-equivariant model: the flipped pass is the mirror of the plain one.
    mirrored = {k: v.flip(3) for k, v in plain.items()}
    merged = flip_merge(plain, mirrored)
    torch.testing.assert_close(merged["heatmap"], plain["heatmap"])
    torch.testing.assert_close(merged["wh"], plain["wh"])
    # In general: the mean of the plain and the un-flipped pass; offsets from the plain pass.
    merged = flip_merge(plain, other)
    torch.testing.assert_close(merged["heatmap"], (plain["heatmap"] + other["heatmap"].flip(3)) / 2)
    torch.testing.assert_close(merged["wh"], (plain["wh"] + other["wh"].flip(3)) / 2)
    assert torch.equal(merged["offset"], plain["offset"])
