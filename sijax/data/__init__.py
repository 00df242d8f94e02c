"""Images: synthetic N(0, 1) training data and file IO (PNG/JPEG via Pillow, .npy)."""

from sijax.data.images import load_image, save_image, validate_image
from sijax.data.synthetic import normal_images

__all__ = ["load_image", "normal_images", "save_image", "validate_image"]
