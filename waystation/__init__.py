"""waystation: durable execution of async pipelines on SQLite.

A pipeline is a list of stages; every transition is committed before the run moves on, so a
run survives crashes and can pause for days and resume, by run id, at the stage it paused in.
Everything public is importable from here; other module paths are private.
"""

from .engine.children import Limits
from .engine.clock import Clock, ManualClock, SystemClock
from .engine.compose import branch, loop, map_children
from .engine.context import StageContext
from .engine.engine import Engine
from .engine.models import Failed, Pause, Run, RunTree, StageError, Transition
from .engine.parallel import parallel
from .engine.pipeline import InputField, Pipeline
from .engine.plan import Plan, PlanInput, PlanParam, PlanStep, make_plan
from .engine.stage import Retry, Stage, gate, sleep_stage, stage, wait_until
from .errors import (
    BudgetExceeded,
    ChildFailed,
    InvalidInput,
    InvalidResumeInput,
    InvalidRunState,
    NotAWaystationDatabase,
    NotPaused,
    ParallelFailed,
    PauseExpired,
    PipelineChanged,
    PipelineDefinitionError,
    PipelineNotRegistered,
    RunAlreadyExists,
    RunNotFound,
    SchemaTooNew,
    StageOutputError,
    StageTimeout,
    StoreError,
    WaitTimeout,
    WaystationError,
)
from .store.base import Store
from .store.sqlite import SQLiteStore

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "ChildFailed",
    "Clock",
    "Engine",
    "Failed",
    "InputField",
    "InvalidInput",
    "InvalidResumeInput",
    "InvalidRunState",
    "Limits",
    "ManualClock",
    "NotAWaystationDatabase",
    "NotPaused",
    "ParallelFailed",
    "Pause",
    "PauseExpired",
    "Pipeline",
    "PipelineChanged",
    "PipelineDefinitionError",
    "PipelineNotRegistered",
    "Plan",
    "PlanInput",
    "PlanParam",
    "PlanStep",
    "Retry",
    "Run",
    "RunAlreadyExists",
    "RunNotFound",
    "RunTree",
    "SQLiteStore",
    "SchemaTooNew",
    "Stage",
    "StageContext",
    "StageError",
    "StageOutputError",
    "StageTimeout",
    "Store",
    "StoreError",
    "SystemClock",
    "Transition",
    "WaitTimeout",
    "WaystationError",
    "__version__",
    "branch",
    "gate",
    "loop",
    "make_plan",
    "map_children",
    "parallel",
    "sleep_stage",
    "stage",
    "wait_until",
]
