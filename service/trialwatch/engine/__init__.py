"""The pure rule engine and the per-subject state it keeps."""

from trialwatch.engine.core import Engine, Tick
from trialwatch.engine.state import SubjectState

__all__ = ["Engine", "SubjectState", "Tick"]
