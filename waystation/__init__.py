"""waystation: durable execution of async pipelines on SQLite.

A pipeline is a list of stages; every transition is committed before the run moves on, so a
run survives crashes and can pause for days and resume, by run id, at the stage it paused in.
Everything public is importable from here; other module paths are private.
"""

from .engine.context import StageContext
from .engine.engine import Engine
from .engine.models import Pause, Run, StageError, Transition
from .engine.pipeline import Pipeline
from .engine.stage import Retry, Stage, gate, stage
from .errors import (
    InvalidInput,
    InvalidResumeInput,
    InvalidRunState,
    NotAWaystationDatabase,
    NotPaused,
    PipelineChanged,
    PipelineDefinitionError,
    PipelineNotRegistered,
    RunAlreadyExists,
    RunNotFound,
    SchemaTooNew,
    StageOutputError,
    StageTimeout,
    StoreError,
    WaystationError,
)
from .store.base import Store
from .store.sqlite import SQLiteStore

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "InvalidInput",
    "InvalidResumeInput",
    "InvalidRunState",
    "NotAWaystationDatabase",
    "NotPaused",
    "Pause",
    "Pipeline",
    "PipelineChanged",
    "PipelineDefinitionError",
    "PipelineNotRegistered",
    "Retry",
    "Run",
    "RunAlreadyExists",
    "RunNotFound",
    "SQLiteStore",
    "SchemaTooNew",
    "Stage",
    "StageContext",
    "StageError",
    "StageOutputError",
    "StageTimeout",
    "Store",
    "StoreError",
    "Transition",
    "WaystationError",
    "__version__",
    "gate",
    "stage",
]
