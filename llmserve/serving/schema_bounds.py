"""What the grammar adds to a JSON schema before llguidance compiles it.

llguidance follows JSON Schema to the letter: an object takes any property it does not list,
a number any count of digits. A small model then wanders (an invented property, a number
that never ends) until max_tokens. llama.cpp's JSON-schema grammar and vLLM's xgrammar read
a missing `additionalProperties` as false and bound digits; llguidance has no option for
either (its JSON options are whitespace, separators, lenient and escapes), so the schema
is rewritten before llguidance sees it, with keywords it enforces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

INT_MIN = -(2**63 - 1024)
INT_MAX = 2**63 - 1
# Numbers: at most 16 integer digits (as llama.cpp) and 10 fraction digits, and no exponent:
# `multipleOf` is the only bound on fraction digits a schema has, and llguidance takes no step
# below 1e-10 (it reads it as a double, then as an integer of at most 32 bits).
NUMBER_LIMIT = 1e16  # exclusive
NUMBER_STEP = 1e-10

ANY_NAME = "llmserve_any"  # the definition of any JSON value with bounded numbers
ANY_REF = f"#/$defs/{ANY_NAME}"

Ptr = tuple[str, ...]  # a JSON pointer's segments

# Keys that constrain nothing (the rest of a schema's keys make it more than "any value").
_NOTES = frozenset({"title", "description", "default", "examples", "$comment", "readOnly",
                    "writeOnly", "deprecated", "$schema", "$id", "$anchor", "$defs",
                    "definitions", "x-guidance"})
_IN_PLACE = ("allOf", "anyOf", "oneOf", "$ref")  # applied to the value itself: intersected


def bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` as its grammar is built (a new schema; `schema` is not changed):
    - an object that lists `properties` (or `patternProperties`) takes no other property
      unless the schema says otherwise (`additionalProperties` or `unevaluatedProperties`
      present); a `required` name it does not list is listed, with any value;
    - an integer left unbounded is held to [INT_MIN, INT_MAX], a number to (-1e16, 1e16) in
      steps of 1e-10, and a value left free (`true`, `{}`, an object without properties, an
      array without items) to JSON whose numbers are those;
    - `minimum`, `maximum`, `maxLength`... the schema has are its own and stay.

    The parts llguidance intersects with others (of an `allOf`, a `$ref` or `anyOf` beside
    keywords of its own) keep their objects open and their numbers without a step: each part
    would refuse the properties the others list, and two `multipleOf` overflow its
    arithmetic (bounds intersect safely)."""
    scan = _Scan()
    while True:  # a part reached through a $ref makes its target a part: to a fixpoint
        known = len(scan.parts)
        scan.walk(schema, (), False)
        if len(scan.parts) == known:
            break
    defs = schema.get("$defs")
    rewrite = _Rewrite(scan.parts, free_ok=not scan.nested_id
                       and (defs is None or isinstance(defs, dict) and ANY_NAME not in defs))
    out = rewrite.node(schema, (), False)
    if rewrite.free_used:
        out["$defs"] = {**out.get("$defs", {}), ANY_NAME: _any_value()}
    return out


def rebased(schema: Any, at: str) -> Any:
    """`schema` to be placed at JSON pointer `at` of a larger one: its local `$ref`s ("#",
    "#/$defs/X") made to point where their targets now are (a copy)."""
    if not isinstance(schema, dict) or "$id" in schema:
        return schema  # (with an "$id", a resource of its own: its refs resolve within it)
    out = _with_children(schema, lambda path, sub, in_place: rebased(sub, at))
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = "#" + at + ref[1:]
    return out


def _any_value() -> dict[str, Any]:
    ref = {"$ref": ANY_REF}
    return {"anyOf": [
        {"type": "null"}, {"type": "boolean"}, {"type": "string"},
        {"type": "number", "exclusiveMinimum": -NUMBER_LIMIT, "exclusiveMaximum": NUMBER_LIMIT,
         "multipleOf": NUMBER_STEP},
        {"type": "array", "items": ref},
        {"type": "object", "additionalProperties": ref},
    ]}


def _children(node: dict[str, Any]) -> Iterator[tuple[Ptr, Any, bool]]:
    """(path below `node`, subschema, whether it is one of `node`'s in-place parts) for the
    subschemas llguidance compiles."""
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield (key, name), sub, False
    for key in ("additionalProperties", "items", "additionalItems"):
        if isinstance(node.get(key), dict | bool):
            yield (key,), node[key], False
    for key in ("prefixItems", "items"):
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield (key, str(i)), sub, False
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield (key, str(i)), sub, True


def _with_children(node: dict[str, Any], new: Callable[[Ptr, Any, bool], Any]) -> dict[str, Any]:
    """A copy of `node` with each subschema s at path p (see `_children`) replaced by
    `new(p, s, in_place)`; what holds them is copied, never changed."""
    out = dict(node)
    for path, sub, in_place in _children(node):
        value = new(path, sub, in_place)
        if len(path) == 1:
            out[path[0]] = value
            continue
        key = path[0]
        if out[key] is node[key]:
            out[key] = type(node[key])(node[key])
        out[key][int(path[1]) if isinstance(out[key], list) else path[1]] = value
    return out


def _alone(node: dict[str, Any]) -> bool:
    """Whether `node`'s in-place parts are taken as they are: one part, and no keyword of
    `node`'s own to intersect it with."""
    parts = sum(len(node[k]) if k == "allOf" and isinstance(node[k], list) else 1
                for k in _IN_PLACE if k in node)
    own = any(k not in _NOTES and k not in _IN_PLACE for k in node)
    return parts <= 1 and not own


def _target(ref: Any) -> Ptr | None:
    """The local JSON pointer a `$ref` names (None for an anchor or another document)."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    frag = unquote(ref[1:])
    if frag == "":
        return ()
    if not frag.startswith("/"):
        return None
    return tuple(s.replace("~1", "/").replace("~0", "~") for s in frag[1:].split("/"))


@dataclass
class _Scan:
    parts: set[Ptr] = field(default_factory=set)  # $ref targets intersected with others
    nested_id: bool = False  # a "$id" below the root: "#/..." would not mean the root there

    def walk(self, node: Any, ptr: Ptr, part: bool) -> None:
        if not isinstance(node, dict):
            return
        part = part or ptr in self.parts
        if ptr and "$id" in node:
            self.nested_id = True
        alone = _alone(node)
        if "$ref" in node and (part or not alone):
            target = _target(node["$ref"])
            if target is not None:
                self.parts.add(target)
        for path, sub, in_place in _children(node):
            self.walk(sub, ptr + path, in_place and (part or not alone))


@dataclass
class _Rewrite:
    parts: set[Ptr]
    free_ok: bool  # a value left free may become ANY_REF
    free_used: bool = False

    def free(self) -> dict[str, Any]:
        self.free_used = True
        return {"$ref": ANY_REF}

    def node(self, node: Any, ptr: Ptr, part: bool) -> Any:
        part = part or ptr in self.parts
        if node is True:
            return node if part or not self.free_ok else self.free()
        if not isinstance(node, dict):
            return node
        alone = _alone(node)
        out = _with_children(node, lambda path, sub, in_place: self.node(
            sub, ptr + path, in_place and (part or not alone)))
        types = _types(node)
        if "const" not in node and "enum" not in node:  # bounds intersect safely: always
            if "number" in types:
                _bound(out, -NUMBER_LIMIT, NUMBER_LIMIT, exclusive=True)
            elif "integer" in types:
                _bound(out, INT_MIN, INT_MAX, exclusive=False)
        if part or any(k in node for k in _IN_PLACE):
            return out  # intersected with other parts: the rest as it is (see `bounded`)
        if all(k in _NOTES for k in node):
            return {**out, **self.free()} if self.free_ok else out
        if "properties" in node or "patternProperties" in node:
            if "additionalProperties" not in node and "unevaluatedProperties" not in node:
                out["additionalProperties"] = False
                self._list_required(out)
        elif "object" in types and "additionalProperties" not in node and self.free_ok:
            out["additionalProperties"] = self.free()
        if "array" in types and "items" not in node and "additionalItems" not in node:
            # a tuple takes the items it lists, as in llama.cpp; a list of anything, any
            if "prefixItems" in node:
                out["items"] = False
            elif self.free_ok:
                out["items"] = self.free()
        if "number" in types and "multipleOf" not in node and "const" not in node \
                and "enum" not in node:
            out["multipleOf"] = NUMBER_STEP
        return out

    def _list_required(self, out: dict[str, Any]) -> None:
        """A required name the object does not list would now be refused: listed, any value."""
        props, required = out.get("properties"), out.get("required")
        if not isinstance(required, list) or not isinstance(props, dict | None):
            return
        missing = [n for n in required if isinstance(n, str) and n not in (props or {})]
        if missing:
            free = self.free() if self.free_ok else True
            out["properties"] = {**(props or {}), **dict.fromkeys(missing, free)}


def _types(node: dict[str, Any]) -> list[str]:
    t = node.get("type")
    if isinstance(t, str):
        return [t]
    return [x for x in t if isinstance(x, str)] if isinstance(t, list) else []


def _bound(out: dict[str, Any], low: float, high: float, *, exclusive: bool) -> None:
    """Give `out` the bounds it lacks, where they leave its own satisfiable."""
    def numbers(*keys: str) -> list[float]:
        values = [out.get(k) for k in keys]
        return [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]

    if "minimum" not in out and "exclusiveMinimum" not in out \
            and all(h > low for h in numbers("maximum", "exclusiveMaximum")):
        out["exclusiveMinimum" if exclusive else "minimum"] = low
    if "maximum" not in out and "exclusiveMaximum" not in out \
            and all(lo < high for lo in numbers("minimum", "exclusiveMinimum")):
        out["exclusiveMaximum" if exclusive else "maximum"] = high
