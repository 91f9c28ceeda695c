"""The one image grid (runtime/grid.py): where each tile lands, grey to RGB, the row length, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from latentforge.runtime.grid import make_grid


def test_tiles_land_row_by_row_with_the_pad_around_and_between():
    images = np.stack([np.full((2, 3, 3), i * 40, np.uint8) for i in range(1, 6)])  # five 2x3 tiles
    grid = make_grid(images, nrow=3, pad=1, fill=7)
    assert grid.shape == (2 * (2 + 1) + 1, 3 * (3 + 1) + 1, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 1 + r * 3, 1 + c * 4
        assert np.all(grid[y : y + 2, x : x + 3] == (i + 1) * 40)
    assert np.all(grid[0] == 7) and np.all(grid[:, 0] == 7)  # the outer pad
    assert np.all(grid[4:6, 9:12] == 7)  # the sixth place of the second row is empty


def test_grey_tiles_become_rgb_and_a_row_holds_at_most_all_images():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    grid = make_grid(images, nrow=8, pad=0)
    assert grid.shape == (4, 8, 3)
    np.testing.assert_array_equal(grid[:, :4, 1], images[0, :, :, 0])
    np.testing.assert_array_equal(grid[:, 4:, 2], images[1, :, :, 0])


def test_default_row_is_about_the_square_root():
    assert make_grid(np.zeros((10, 2, 2, 3), np.uint8), pad=0).shape == (3 * 2, 4 * 2, 3)


def test_other_channel_counts_are_refused():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make_grid(np.zeros((2, 4, 4, 2), np.uint8))
