"""The PNG grids that ``latentforge serve --demo`` writes from the images the app returns."""

import numpy as np
from PIL import Image

from latentforge.serving.codec import encode_png
from latentforge.serving.demo import _save


def test_demo_grid_tiles_the_returned_pngs_two_white_pixels_apart_and_upscales_them(tmp_path):
    colours = np.linspace(0.1, 0.9, 10)
    pngs = [encode_png(np.full((3, 16, 16), c)) for c in colours]
    grid = np.asarray(Image.open(_save(pngs, tmp_path / "g.png", scale=4, columns=8)))
    assert grid.shape == ((2 * 18 - 2) * 4, (8 * 18 - 2) * 4, 3)
    assert (grid[:, 16 * 4 : 18 * 4] == 255).all()  # the gap between the first two columns
    ninth = grid[18 * 4 : 34 * 4, 0 : 16 * 4]  # the ninth image starts the second row
    assert np.abs(ninth.astype(int) - round(colours[8] * 255)).max() <= 1


def test_demo_grid_of_grey_images_is_rgb(tmp_path):
    pngs = [encode_png(np.zeros((1, 8, 8))) for _ in range(3)]
    assert np.asarray(Image.open(_save(pngs, tmp_path / "g.png", scale=1))).shape == (8, 3 * 10 - 2, 3)
