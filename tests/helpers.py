"""Small helpers shared by the test modules."""

import numpy as np
from PIL import Image


def random_image(seed: int, h: int = 90, w: int = 120) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))
