"""The error hierarchy. Every error waystation raises is a `WaystationError`.

Each message says what went wrong and, where there is one, what to do next.
"""

from __future__ import annotations


class WaystationError(Exception):
    """Base class of every error raised by waystation."""


class PipelineDefinitionError(WaystationError):
    """A pipeline is malformed (duplicate names, unbound parameters, bad ordering, ...)."""


class PipelineNotRegistered(WaystationError):
    """The engine was asked to run a pipeline it was not opened with."""


class PipelineChanged(WaystationError):
    """A run was started under a pipeline whose definition differs from the registered one."""


class InvalidInput(WaystationError):
    """A run's input does not match the pipeline's input fields."""


class InvalidResumeInput(WaystationError):
    """A resume value does not match the pause's schema. The run stays paused, untouched."""


class RunNotFound(WaystationError):
    """No run with this id exists in the database."""


class RunAlreadyExists(WaystationError):
    """A run with this id already exists for a different pipeline."""


class NotPaused(WaystationError):
    """The run is not paused (any more): it cannot be resumed."""


class InvalidRunState(WaystationError):
    """The operation does not apply to a run in its current status."""


class StageOutputError(WaystationError):
    """A stage returned a value that does not match its annotation or cannot be serialized."""


class StoreError(WaystationError):
    """The database cannot be used: not a waystation database, newer schema, I/O failure."""


class SchemaTooNew(StoreError):
    """The database was written by a newer waystation; upgrade waystation to open it."""


class NotAWaystationDatabase(StoreError):
    """The file exists but is not a waystation database (or not SQLite at all)."""


class StageTimeout(WaystationError, TimeoutError):
    """A stage attempt ran longer than its `timeout`."""


class BudgetExceeded(WaystationError):
    """A run tree went past one of its limits (depth, stage executions, children, a named
    budget). The message names the limit, the amount and the chain of runs."""


class ChildFailed(WaystationError):
    """A child run failed; the message carries the chain of pipelines and stages to the
    stage that failed, and its error."""


class WaitTimeout(WaystationError, TimeoutError):
    """`start`, `wait` or `resume` gave up waiting (`timeout=`); the run itself goes on."""


class ParallelFailed(WaystationError):
    """Branches of a parallel group failed; the message names each branch and its error."""


class PauseExpired(WaystationError):
    """A pause with `expires_after` was not answered in time (and its gate says fail)."""
