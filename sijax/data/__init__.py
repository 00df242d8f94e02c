"""Images: synthetic N(0, 1) training data, image files, data sets, bundled real data.

* :mod:`sijax.data.images`: reading PNG/JPEG/TIFF/.npy (8/16-bit, grey/RGB) with one
  bit-depth scaling rule; writing.
* :mod:`sijax.data.preprocess`: :class:`Preprocessing`, the recorded map from a stored
  image to the model input (size, crop, channels, standardisation).
* :mod:`sijax.data.datasets`: :func:`open_dataset` for folders, stacks and the MVTec AD
  layout; :func:`data_source` identifies a data set for config.json.
* :mod:`sijax.data.bundled`: :func:`build_dataset` writes offline real data sets
  (scikit-learn digits, scikit-image textures) with synthetic defects and masks;
  needs ``pip install -e '.[data]'``, imported only when a data set is built.
"""

from sijax.data.bundled import build_dataset, defect_kinds, list_datasets
from sijax.data.datasets import Dataset, Item, LabelledImage, data_source, open_dataset
from sijax.data.images import (
    IMAGE_SUFFIXES,
    load_image,
    read_raw,
    save_image,
    scale_intensity,
    validate_image,
)
from sijax.data.preprocess import InputWarning, Preprocessing
from sijax.data.synthetic import normal_images

__all__ = [
    "IMAGE_SUFFIXES",
    "Dataset",
    "InputWarning",
    "Item",
    "LabelledImage",
    "Preprocessing",
    "build_dataset",
    "defect_kinds",
    "data_source",
    "list_datasets",
    "load_image",
    "normal_images",
    "open_dataset",
    "read_raw",
    "save_image",
    "scale_intensity",
    "validate_image",
]
