"""`Pipeline`: an ordered list of stages, checked when built and compiled into bindings.

Building a pipeline resolves, once, where every stage parameter comes from (the run input or
an earlier stage's output), infers the input fields, and computes a fingerprint of the shape,
so a paused run is never continued by a pipeline that has changed under it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from ..errors import InvalidInput, PipelineDefinitionError
from ..store import codec
from ..store.base import NewTransition
from .stage import EMPTY, Param, Retry, Stage

if TYPE_CHECKING:
    from .children import Limits


CHILD_KEYS: dict[str, int] = {"child_keys": 2}
"""In every new run's `created` row: the children of its parallel branches are keyed by
branch. A run without it was created before that (its branches' children may be under
the old key: `ChildRunner._legacy_branch_child`)."""


def has_child_keys(origin: Mapping[str, Any]) -> bool:
    """Whether a `created` row's payload carries the `CHILD_KEYS` mark."""
    return origin.get("child_keys") == CHILD_KEYS["child_keys"]


@dataclass(frozen=True, slots=True)
class Binding:
    """Where one parameter's value comes from."""

    param: str
    from_stage: int | None
    """Index of the earlier stage whose output it is, or None for a run input field."""
    key: str
    """The input field (or the stage name) it is bound to."""
    convert: Any = None
    """A type to decode the stored output into, when it differs from the producer's type."""
    branch: str | None = None
    """For the output of one branch of a parallel group: the branch's name."""


@dataclass(frozen=True, slots=True)
class Slot:
    """A place that executes: a stage, or one branch of a parallel group."""

    index: int
    """The stage index (a group's branches share their group's)."""
    path: str
    """The stage name, or `group.branch` for a branch: what the journal records."""
    key: int | str
    """Where its attempts and answers are kept in a run's state: the index, or the path."""
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True)
class InputField:
    """One field of a pipeline's input."""

    name: str
    type: Any
    default: Any = EMPTY

    @property
    def required(self) -> bool:
        """True when the run input must provide it."""
        return self.default is EMPTY


class Pipeline:
    """A named, versioned, ordered list of stages.

    `inputs` are the parameters that no earlier stage provides (inferred, like a function's
    signature), unless `input=` pins them to a msgspec Struct or dataclass. The output of a
    run is the output of its last stage.
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[Stage | Pipeline],
        *,
        version: str = "1",
        input: type | None = None,
        limits: Limits | None = None,
        budgets: Mapping[str, float] | None = None,
        on_failure: Literal["fail", "compensate"] = "fail",
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
            raise PipelineDefinitionError(f"pipeline name {name!r} must be printable, 1-200 chars")
        self.name = name
        self.version = str(version)
        self.limits = limits
        """Overrides the engine's tree limits for children launched by this pipeline."""
        self.budgets: dict[str, float] = dict(budgets or {})
        """Limits of named budgets (`ctx.spend`) for trees run under this pipeline."""
        if on_failure not in ("fail", "compensate"):
            raise PipelineDefinitionError("on_failure must be 'fail' or 'compensate'")
        self.on_failure = on_failure
        """With "compensate", a failed run first runs the `compensate` functions of its
        completed stages, last first (a saga)."""
        self.stages: tuple[Stage, ...] = tuple(
            s.as_stage() if isinstance(s, Pipeline) else s for s in stages
        )
        self.input_type = input
        if not self.stages:
            raise PipelineDefinitionError(f"pipeline {name!r} has no stages")
        for s in self.stages:
            if not isinstance(s, Stage):
                raise PipelineDefinitionError(
                    f"pipeline {name!r}: {s!r} is not a stage; decorate it with @ws.stage "
                    "(or pass a Pipeline, which runs as a child)"
                )
        self.index: dict[str, int] = {}
        self.branch_index: dict[str, int] = {}
        """Branch name -> index of its parallel group."""
        for i, s in enumerate(self.stages):
            for n in (s.name, *(b.name for b in _branches(s))):
                if n in self.index or n in self.branch_index:
                    first = self.index.get(n, self.branch_index.get(n))
                    raise PipelineDefinitionError(
                        f"pipeline {name!r}: two stages or branches are named {n!r} "
                        f"(positions {first} and {i}); give one a different name"
                    )
                if n == s.name:
                    self.index[n] = i
                else:
                    self.branch_index[n] = i
            if s.kind == "parallel" and s.when is not None:
                raise PipelineDefinitionError(
                    f"pipeline {name!r}: put `when` on the branches of {s.name!r}, not the group"
                )
        self.inputs: dict[str, InputField] = (
            self._pinned_inputs(input) if input is not None else self._inferred_inputs()
        )
        self.bindings: tuple[tuple[Binding, ...], ...] = tuple(
            self._bind(i, s.params, s.name) for i, s in enumerate(self.stages)
        )
        self.when_bindings: tuple[tuple[Binding, ...], ...] = tuple(
            self._bind(i, s.when_params, f"`when` of {s.name}") for i, s in enumerate(self.stages)
        )
        self.slots: tuple[Slot, ...] = tuple(
            Slot(i, s.name, i, self.bindings[i]) for i, s in enumerate(self.stages)
        )
        self.branch_slots: dict[int, dict[str, Slot]] = {}
        self.branch_when_bindings: dict[str, tuple[Binding, ...]] = {}
        for i, s in enumerate(self.stages):
            for b in _branches(s):
                path = f"{s.name}.{b.name}"
                self.branch_slots.setdefault(i, {})[b.name] = Slot(
                    i, path, path, self._bind(i, b.params, f"branch {path}")
                )
                self.branch_when_bindings[path] = self._bind(
                    i, b.when_params, f"`when` of branch {path}"
                )
        self._input_struct = input or msgspec.defstruct(
            f"{_identifier(name)}Input",
            [
                (f.name, f.type) if f.required else (f.name, f.type, f.default)
                for f in self.inputs.values()
            ],
            kw_only=True,
        )
        self._check_cycles([])
        self.fingerprint = self._fingerprint()
        self.created_payload = codec.encode({"shape": self.shape(), **CHILD_KEYS}).decode()
        """The payload of each new run's `created` row (built once: a pipeline does not
        change after it is built)."""
        self.plain: tuple[bool, ...] = tuple(
            s.kind == "stage"
            and s.is_async
            and s.timeout is None
            and s.retry.attempts == 1
            and s.context_param is None
            and s.when is None
            for s in self.stages
        )
        """Per stage: an async function with no retry, timeout, context or condition, which
        the stepper calls directly (the common case, kept short)."""
        self.launches = any(
            s.kind == "child" or s.context_param is not None
            for stage in self.stages
            for s in (_branches(stage) or (stage,))
        )
        """Whether a stage may launch child runs (a child stage, or one given a context)."""
        self.started: tuple[NewTransition, ...] = tuple(
            NewTransition("started", i, s.name, 1) for i, s in enumerate(self.stages)
        )
        """Per stage: the journal row of its first attempt starting."""

    # -- building ----------------------------------------------------------------------------

    def _pinned_inputs(self, tp: type) -> dict[str, InputField]:
        hints = typing.get_type_hints(tp)
        fields: dict[str, InputField] = {}
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            for f in msgspec.structs.fields(tp):
                default = EMPTY
                if f.default is not msgspec.NODEFAULT:
                    default = f.default
                elif f.default_factory is not msgspec.NODEFAULT:
                    default = f.default_factory()
                fields[f.name] = InputField(f.name, hints.get(f.name, Any), default)
        elif dataclasses.is_dataclass(tp):
            for df in dataclasses.fields(tp):
                default = EMPTY
                if df.default is not dataclasses.MISSING:
                    default = df.default
                elif df.default_factory is not dataclasses.MISSING:
                    default = df.default_factory()
                fields[df.name] = InputField(df.name, hints.get(df.name, Any), default)
        else:
            raise PipelineDefinitionError(
                f"pipeline {self.name!r}: input= must be a msgspec Struct or a dataclass"
            )
        for field in fields:
            if field in self.index or field in self.branch_index:
                raise PipelineDefinitionError(
                    f"pipeline {self.name!r}: input field {field!r} is shadowed by the stage "
                    f"of the same name; rename one of them"
                )
        return fields

    def _inferred_inputs(self) -> dict[str, InputField]:
        fields: dict[str, InputField] = {}
        for i, s in enumerate(self.stages):
            params = [*s.when_params, *s.params]
            for b in _branches(s):
                params += [*b.when_params, *b.params]
            for p in params:
                if p.name in self.index or p.name in self.branch_index:
                    continue  # a stage output (ordering is checked in _bind)
                seen = fields.get(p.name)
                if seen is None:
                    fields[p.name] = InputField(p.name, p.annotation, p.default)
                    continue
                if seen.type is Any:
                    seen = InputField(p.name, p.annotation, seen.default)
                elif p.annotation is not Any and p.annotation != seen.type:
                    raise PipelineDefinitionError(
                        f"pipeline {self.name!r}: input {p.name!r} is {seen.type!r} in one stage "
                        f"and {p.annotation!r} in stage {s.name!r} (position {i}); "
                        "use one type"
                    )
                if p.required and not seen.required:
                    seen = InputField(p.name, seen.type)
                fields[p.name] = seen
        return fields

    def _bind(self, position: int, params: Sequence[Param], who: str) -> tuple[Binding, ...]:
        out = []
        for p in params:
            branch_of = self.branch_index.get(p.name)
            if branch_of is not None:
                if branch_of >= position:
                    raise PipelineDefinitionError(
                        f"pipeline {self.name!r}: {who} (position {position}) takes "
                        f"{p.name!r}, a branch of the group at position {branch_of}; a stage "
                        "can only use the outputs of earlier stages (branches of one group "
                        "run side by side and cannot use each other's outputs)"
                    )
                group = self.stages[branch_of]
                producer = next(b for b in _branches(group) if b.name == p.name)
                convert = None
                wanted = _without_failed(p.annotation)
                if wanted is not Any and wanted != producer.returns:
                    convert = wanted
                out.append(Binding(p.name, branch_of, p.name, convert, branch=p.name))
                continue
            source = self.index.get(p.name)
            if source is not None:
                if source >= position:
                    where = "itself" if source == position else f"stage {source}, after it"
                    raise PipelineDefinitionError(
                        f"pipeline {self.name!r}: {who} (position {position}) takes "
                        f"{p.name!r}, the output of {where}; a stage can only use the "
                        "outputs of earlier stages"
                    )
                producer = self.stages[source]
                convert = None
                wanted = _without_failed(p.annotation)
                if wanted is not Any and wanted != producer.returns:
                    convert = wanted
                out.append(Binding(p.name, source, p.name, convert))
            elif p.name in self.inputs:
                field = self.inputs[p.name]
                convert = None
                if p.annotation is not Any and p.annotation != field.type:
                    convert = p.annotation
                out.append(Binding(p.name, None, p.name, convert))
            elif p.required:
                raise PipelineDefinitionError(
                    f"pipeline {self.name!r}: parameter {p.name!r} of {who} is provided by "
                    f"neither the input ({self.input_type.__name__ if self.input_type else ''}) "
                    "nor an earlier stage; add the field or a stage of that name"
                )
        return tuple(out)

    def stage_at(self, index: int, path: str | None = None) -> Stage:
        """The stage at `index`, or the branch `path` (`group.branch`) of the group there."""
        stage = self.stages[index]
        if path and path != stage.name and stage.group is not None:
            name = path.split(".", 1)[-1]
            branches: tuple[Stage, ...] = stage.group.branches
            for branch in branches:
                if branch.name == name:
                    return branch
        return stage

    def children(self) -> list[Pipeline]:
        """The pipelines this one runs as children through its stages (not recursively)."""
        out: list[Pipeline] = []
        for s in self.stages:
            for part in (s, *_branches(s)):
                if part.compose is not None:
                    out.extend(part.compose.pipelines.values())
        return out

    def _check_cycles(self, path: list[str]) -> None:
        if self.name in path:
            cycle = " > ".join([*path[path.index(self.name) :], self.name])
            raise PipelineDefinitionError(
                f"pipeline {self.name!r} includes itself: {cycle}; use ctx.run_child for "
                "bounded recursion instead"
            )
        for child in self.children():
            child._check_cycles([*path, self.name])

    def as_stage(
        self,
        name: str | None = None,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: Mapping[str, str] | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        when: Callable[..., Any] | None = None,
        continue_on_error: bool = False,
    ) -> Stage:
        """This pipeline as a stage of another: it runs as a child run.

        `inputs` maps the child's input fields to dotted paths into the parent's input and
        earlier outputs (`{"doc": "load.documents.0"}`); fields not mapped bind by name.
        `outputs` maps names to dotted paths into the child's stage outputs
        (`{"accuracy": "score.metrics.accuracy"}`), and the stage's output is that mapping;
        without it, the stage's output is the child's output.
        """
        from .compose import child_stage

        return child_stage(
            self,
            name,
            inputs=inputs,
            outputs=outputs,
            retry=retry,
            timeout=timeout,
            when=when,
            continue_on_error=continue_on_error,
        )

    def shape(self) -> list[str]:
        """The stages as readable signatures (`stage:charge(order: Order, ...) -> Receipt`),
        recorded with each run so that `PipelineChanged` can say what changed."""
        out = []
        for s in self.stages:
            for part in (s, *_branches(s)):
                params = ", ".join(f"{p.name}: {_short(p.annotation)}" for p in part.params)
                line = f"{part.kind}:{part.name}({params}) -> {_short(part.returns)}"
                for child in part.compose.pipelines.values() if part.compose is not None else ():
                    line += f" [{child.name} v{child.version} {child.fingerprint}]"
                out.append(line)
        return out

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.name}\0{_type_name(self.input_type)}\0".encode())
        for s in self.stages:
            for part in (s, *_branches(s)):
                params = ",".join(f"{p.name}:{_type_name(p.annotation)}" for p in part.params)
                h.update(
                    f"{part.kind}:{part.name}({params})->{_type_name(part.returns)}\0".encode()
                )
                for child in part.compose.pipelines.values() if part.compose is not None else ():
                    h.update(f"[{child.name}:{child.version}:{child.fingerprint}]".encode())
        return h.hexdigest()[:16]

    # -- use ---------------------------------------------------------------------------------

    def validate_input(self, value: Any) -> tuple[str, Any]:
        """Check a run input; returns (the JSON stored, the typed value stages see).

        Raises `InvalidInput` naming the field that is missing or of the wrong type.
        """
        if isinstance(value, msgspec.Struct) or dataclasses.is_dataclass(value):
            if self.input_type is not None and not isinstance(value, self.input_type):
                raise InvalidInput(
                    f"pipeline {self.name!r} takes {self.input_type.__name__} as input, "
                    f"not {type(value).__name__}"
                )
        elif value is None:
            value = {}
        elif not isinstance(value, dict):
            raise InvalidInput(
                f"pipeline {self.name!r}: the input must be a mapping of field names to "
                f"values (fields: {', '.join(self.inputs) or 'none'}), not "
                f"{type(value).__name__}"
            )
        try:
            raw = codec.encode(value)
        except RecursionError as exc:
            raise InvalidInput(
                f"pipeline {self.name!r}: input is nested too deeply to store: {exc}"
            ) from exc
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise InvalidInput(
                f"pipeline {self.name!r}: input cannot be serialized: {exc}"
            ) from exc
        if b"null" in raw and codec.has_nonfinite(value):
            raise InvalidInput(
                f"pipeline {self.name!r}: the input holds NaN or infinity, which JSON cannot "
                "store (it would be stored as null); pass None or a string instead"
            )
        return self.decode_input(raw)

    def decode_input(self, raw: bytes | str) -> tuple[str, Any]:
        """Decode stored input JSON into the typed input (a dict, or the pinned type)."""
        try:
            typed = codec.decode(raw, self._input_struct)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"pipeline {self.name!r}: invalid input: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise InvalidInput(f"pipeline {self.name!r}: input is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise InvalidInput(
                f"pipeline {self.name!r}: input is nested too deeply to read back: {exc}"
            ) from exc
        text = raw.decode() if isinstance(raw, bytes) else raw
        if self.input_type is not None:
            return text, typed
        return text, msgspec.structs.asdict(typed)  # the fields of `inputs`, in order

    def __repr__(self) -> str:
        return f"<Pipeline {self.name} v{self.version} ({len(self.stages)} stages)>"


def _without_failed(annotation: Any) -> Any:
    """`ws.Failed | Report` -> `Report`: a Failed output is handed over as it is, never
    decoded, so only the other members of the union describe what gets decoded (msgspec
    cannot decode a union of a tagged and an untagged Struct)."""
    from .models import Failed

    args = typing.get_args(annotation)
    if Failed not in args or typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    rest = [a for a in args if a is not Failed]
    if len(rest) == 1:
        return rest[0]
    return typing.Union[tuple(rest)]  # noqa: UP007


def _branches(stage: Stage) -> tuple[Stage, ...]:
    return stage.group.branches if stage.group is not None else ()


def _identifier(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name)
    return out if out[:1].isalpha() else f"P{out}"


def _short(tp: Any) -> str:
    if tp is Any:
        return "Any"
    return tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _type_name(tp: Any) -> str:
    """A type's name and, where msgspec can describe it, its shape (JSON Schema), so that a
    Struct gaining a required field changes the fingerprint even if its name does not."""
    if tp is None:
        return "None"
    # The module is left out: a pipeline defined in a script run as __main__ must keep its
    # fingerprint when another process imports that script by name; the shape covers it.
    name = tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("__main__.", "")
    if tp is Any:
        return name
    try:
        shape = codec.encode(codec.json_schema(tp)).decode()
    except (TypeError, ValueError):
        return name
    return f"{name}={shape}"
