"""The decoded-image cache: same samples as without it, its budget and summary, unreadable images,
and loader workers that read the parent's cached pixels (they never decode)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from centerx.data.base import ImageReadError
from centerx.data.cache import CachedImages
from centerx.data.pipeline import TrainingDataset, build_loader
from centerx.data.synthetic import SyntheticShapes
from centerx.data.transforms import AugmentConfig

SIZE = 64


class Breakable(SyntheticShapes):
    """Synthetic images that stop loading once `broken` is set (the files went away), or that
    never load at the indices in `unreadable`. `decodes` counts renders, for pixels or boxes."""

    def __init__(self, unreadable: set[int] = frozenset(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.unreadable = set(unreadable)
        self.broken = False
        self.decodes = 0

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.broken or index in self.unreadable:
            raise ImageReadError(f"image_{index}.jpg: not a decodable image")
        self.decodes += 1
        return super()._render(index)


def source(**kwargs) -> Breakable:
    return Breakable(num_images=6, seed=0, image_size=SIZE, **kwargs)


def test_cached_images_equal_the_source_and_are_read_only(caplog) -> None:
    plain = source()
    with caplog.at_level(logging.INFO, logger="centerx.data.cache"):
        cached = CachedImages(source(), max_mib=64)
    assert len(cached.images) == 6 and cached.source.decodes == 6
    assert cached.nbytes == sum(plain.load_image(i).nbytes for i in range(6))
    for index in range(6):
        image, annotation = cached.load(index)
        expected_image, expected = plain.load(index)
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(annotation.boxes, expected.boxes)
        np.testing.assert_array_equal(annotation.labels, expected.labels)
        assert not image.flags.writeable
    assert cached.source.decodes == 6  # every load above, pixels and boxes, came from memory
    assert cached.class_names == plain.class_names and len(cached) == 6
    assert cached.image_info(2) == plain.image_info(2)
    mib = cached.nbytes / 2**20
    assert f"image cache: 6 images, {mib:.0f} MiB (of 6 images" in caplog.text


def test_budget_and_unreadable_images() -> None:
    one_image = source().load_image(0).nbytes
    cached = CachedImages(source(unreadable={1}), max_mib=2.5 * one_image / 2**20)
    assert sorted(cached.images) == [0, 2]  # two fit; 1 is unreadable
    assert cached.nbytes <= cached.budget
    np.testing.assert_array_equal(cached.load_image(4), source().load_image(4))  # decoded again
    with pytest.raises(ImageReadError):
        cached.load_image(1)  # still reported where training meets it


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_read_the_cached_pixels(workers: int) -> None:
    """Built in the parent, the cache reaches forked workers: once the underlying images can no
    longer be read, the cached loader still gives the samples of the uncached one."""
    augment = AugmentConfig(scale=(0.6, 1.4), shift=0.2, flip=0.5, color=0.3)

    def batches(dataset_source) -> list[dict]:
        dataset = TrainingDataset(dataset_source, SIZE, augment=augment, seed=0)
        loader = build_loader(dataset, batch_size=3, shuffle=False, num_workers=workers)
        return list(loader)

    expected = batches(source())
    cached = CachedImages(source(), max_mib=64)
    cached.source.broken = True
    got = batches(cached)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected, strict=True):
        assert a["num_skipped"] == 0
        for key in ("image", "heatmap", "wh", "index", "mask"):
            assert torch.equal(a[key], b[key]), key
