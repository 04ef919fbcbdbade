"""Scoring: the windowed, de-duplicated scorer, and whole files through it."""

from .files import FileResult, score_csv, score_stream
from .scorer import Scorer, score_pairs

__all__ = ["FileResult", "Scorer", "score_csv", "score_pairs", "score_stream"]
