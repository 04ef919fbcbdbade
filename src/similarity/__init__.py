"""Score how well a caption describes an image with CLIP.

The public API: ``load_model`` a local model directory, build a ``Fetcher`` (or let
``bootstrap.build`` make both from the settings), and ``score_pairs`` records, or ``score_csv``
whole files.
"""

from ._version import __version__ as __version__
from .errors import ROW_ERROR_CODES, RowError, RunError, SimilarityError
from .fetch import AddressPolicy, Fetcher, FetchSettings, classify
from .model import ClipModel, load_model
from .pipeline import score_csv, score_pairs
from .types import Record, ScoreResult, ScoreStats

__all__ = [
    "ROW_ERROR_CODES",
    "AddressPolicy",
    "ClipModel",
    "FetchSettings",
    "Fetcher",
    "Record",
    "RowError",
    "RunError",
    "ScoreResult",
    "ScoreStats",
    "SimilarityError",
    "classify",
    "load_model",
    "score_csv",
    "score_pairs",
]
