"""Score how well a caption describes an image with CLIP."""

__version__ = "0.1.0"

from .errors import ROW_ERROR_CODES, JobError, RowError, SimilarityError  # noqa: E402
from .fetch import Fetcher, FetchSettings  # noqa: E402
from .model import ClipModel, load_model  # noqa: E402
from .netguard import AddressPolicy, classify  # noqa: E402
from .records import Record, ScoreResult  # noqa: E402
from .scoring import ScoreStats, score_pairs  # noqa: E402

__all__ = [
    "AddressPolicy",
    "ClipModel",
    "FetchSettings",
    "Fetcher",
    "JobError",
    "ROW_ERROR_CODES",
    "Record",
    "RowError",
    "ScoreResult",
    "ScoreStats",
    "SimilarityError",
    "classify",
    "load_model",
    "score_pairs",
]
