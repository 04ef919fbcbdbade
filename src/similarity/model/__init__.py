"""The CLIP model: directory checks and identity, tokenizer, preprocessing, backend selection and
the ``ClipModel`` facade that ties them together."""

from .clip import ClipModel, ModelInfo, load_model
from .device_pixels import PIXEL_PATHS, PixelPath
from .directory import DEFAULT_MODEL_DIR, DEFAULT_MODEL_ID, MODEL_META_FILE, check_model_dir, read_identity
from .preprocess import PreprocessConfig
from .selection import Selection, resolve

__all__ = [
    "DEFAULT_MODEL_DIR",
    "DEFAULT_MODEL_ID",
    "MODEL_META_FILE",
    "PIXEL_PATHS",
    "ClipModel",
    "ModelInfo",
    "PixelPath",
    "PreprocessConfig",
    "Selection",
    "check_model_dir",
    "load_model",
    "read_identity",
    "resolve",
]
