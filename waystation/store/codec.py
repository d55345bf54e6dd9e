"""Payload encoding: msgspec JSON, so rows stay readable with the `sqlite3` shell.

Decoders are cached per type because building one costs far more than using it, and the
per-stage path decodes every output once (to check it against its annotation).
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
import re
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
encode = _encoder.encode
"""Encode a value to JSON bytes; raises `msgspec.EncodeError`/`TypeError` when it cannot."""

_any_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()


def decode_any(data: bytes | str | None) -> Any:
    """Decode JSON into builtins (dicts, lists, ...); None stays None."""
    if data is None:
        return None
    return _any_decoder.decode(data)


@functools.lru_cache(maxsize=1024)
def _decoder(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)


def decoder_for(tp: Any) -> msgspec.json.Decoder[Any]:
    """A cached decoder for `tp` (any type msgspec supports)."""
    try:
        return _decoder(tp)
    except TypeError:  # unhashable annotation (rare): build one each time
        return msgspec.json.Decoder(tp)


def decode(data: bytes | str, tp: Any) -> Any:
    """Decode JSON into `tp`, raising `msgspec.ValidationError` naming the bad field."""
    return decoder_for(tp).decode(data)


def has_nonfinite(value: Any, depth: int = 0) -> bool:
    """Whether `value` holds a NaN or an infinity, which JSON cannot store: msgspec writes
    them as null, so such a value would be stored as something else than what was given.
    Looks 200 levels deep at most: below that it stops rather than exhaust Python's stack.
    Callers ask only when the encoded JSON holds a `null`, so most values cost nothing."""
    if depth > 200:
        return False
    if type(value) is float:
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_nonfinite(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(has_nonfinite(v, depth + 1) for v in value)
    if isinstance(value, msgspec.Struct):
        return any(has_nonfinite(getattr(value, f), depth + 1) for f in value.__struct_fields__)
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        return any(has_nonfinite(getattr(value, f), depth + 1) for f in fields)
    return False


def json_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of `tp` (as msgspec generates it)."""
    schema: dict[str, Any] = msgspec.json.schema(tp)
    return schema


def type_ref(tp: Any) -> str | None:
    """`module:qualname` for a module-level class, so another process can import it back."""
    module = getattr(tp, "__module__", None)
    qualname = getattr(tp, "__qualname__", None)
    if not isinstance(tp, type) or not module or not qualname or "<locals>" in qualname:
        return None
    if module == "builtins":
        return None
    return f"{module}:{qualname}"


def resolve_type_ref(ref: str) -> Any | None:
    """Import a `module:qualname` reference; None when it no longer resolves."""
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


class SchemaViolation(ValueError):
    """A value does not satisfy a JSON Schema; the message names the path."""


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def validate_schema(value: Any, schema: dict[str, Any]) -> None:
    """Check `value` (decoded JSON) against the subset of JSON Schema that msgspec emits.

    Used to validate a resume answer when the pause's Python type cannot be imported in this
    process (a builtin or generic type): the stage still decodes the answer with its own type.
    """
    _validate(value, schema, schema.get("$defs", {}), "$")


def _check_bounds(value: Any, schema: dict[str, Any], path: str) -> None:
    """The constraints msgspec emits from `Meta` (ge/le/gt/lt, lengths, pattern, ...)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        for key, holds in (
            ("minimum", operator.ge),
            ("maximum", operator.le),
            ("exclusiveMinimum", operator.gt),
            ("exclusiveMaximum", operator.lt),
        ):
            if key in schema and not holds(value, schema[key]):
                raise SchemaViolation(
                    f"Expected a number satisfying {key} {schema[key]}, got {value!r} - at `{path}`"
                )
        step = schema.get("multipleOf")
        if step and (value / step) != int(value / step):
            raise SchemaViolation(f"Expected a multiple of {step}, got {value!r} - at `{path}`")
    sized: list[tuple[str, str, int]] = []
    if isinstance(value, str):
        sized = [("minLength", ">=", len(value)), ("maxLength", "<=", len(value))]
        pattern = schema.get("pattern")
        if pattern is not None and re.search(pattern, value) is None:
            raise SchemaViolation(
                f"Expected `str` matching regex {pattern!r}, got {value!r} - at `{path}`"
            )
    elif isinstance(value, list):
        sized = [("minItems", ">=", len(value)), ("maxItems", "<=", len(value))]
    elif isinstance(value, dict):
        sized = [("minProperties", ">=", len(value)), ("maxProperties", "<=", len(value))]
    for key, op, size in sized:
        if key in schema and not (size >= schema[key] if op == ">=" else size <= schema[key]):
            raise SchemaViolation(
                f"Expected length {op} {schema[key]} ({key}), got {size} - at `{path}`"
            )


def _validate(value: Any, schema: dict[str, Any], defs: dict[str, Any], path: str) -> None:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        _validate(value, defs[name], defs, path)
        return
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                _validate(value, option, defs, path)
                return
            except SchemaViolation:
                continue
        raise SchemaViolation(f"{value!r} matches none of the allowed shapes - at `{path}`")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaViolation(f"Expected one of {schema['enum']!r}, got {value!r} - at `{path}`")
    if "const" in schema and value != schema["const"]:
        raise SchemaViolation(f"Expected {schema['const']!r}, got {value!r} - at `{path}`")
    kinds = schema.get("type")
    if kinds is not None:
        names = [kinds] if isinstance(kinds, str) else list(kinds)
        ok = False
        for name in names:
            allowed = _JSON_TYPES.get(name, ())
            is_bool = isinstance(value, bool)
            if isinstance(value, allowed) and (name == "boolean" or not is_bool):
                ok = True
                break
        if not ok:
            raise SchemaViolation(
                f"Expected `{' | '.join(names)}`, got `{type(value).__name__}` - at `{path}`"
            )
    _check_bounds(value, schema, path)
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        for field in schema.get("required", []):
            if field not in value:
                raise SchemaViolation(f"Object missing required field `{field}` - at `{path}`")
        for key, item in value.items():
            if key in props:
                _validate(item, props[key], defs, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                _validate(item, schema["additionalProperties"], defs, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise SchemaViolation(f"Object contains unknown field `{key}` - at `{path}`")
    if isinstance(value, list):
        prefix = schema.get("prefixItems")
        if prefix is not None:
            if len(value) != len(prefix):
                raise SchemaViolation(
                    f"Expected array of length {len(prefix)}, got {len(value)} - at `{path}`"
                )
            for i, (item, sub) in enumerate(zip(value, prefix, strict=True)):
                _validate(item, sub, defs, f"{path}[{i}]")
        elif isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                _validate(item, schema["items"], defs, f"{path}[{i}]")
