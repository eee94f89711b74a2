"""`tinker_client` is a drop-in for the Tinker SDK 0.38: the same clients, types, top-level names and exceptions.

Tinker's API is read statically from its wheel (see tinker_reference.py), ours with `inspect`. Each test covers one
area and lists every difference in it, one line each, so that a failure reads as a checklist. Names that README.md
lists under `### Not in this SDK` may be missing. `python -m tests.test_tinker_parity [FILE]` prints the whole report.

What counts as the same:
- a method: same parameter names, order and kind (positional / keyword-only / *args / **kwargs), same defaults
  (ours may give one where tinker requires the argument), same async-ness, and (clients only) a compatible return
  annotation once normalised (see `normalize_annotation`; ours may be a narrower union); ours may add keyword-only
  parameters with defaults, nothing else. Parameters named `_x` are internal and skipped.
- a type: every field exists, as a constructor argument with the same default; every method and property exists
  with the same parameters; a `Literal` alias has the same values; an enum the same members.
- an exception: same name, same chain of base classes (by name), the same public attributes and class defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import os
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tinker_client
from tinker_client import types as our_types

from .tinker_reference import CLIENT_CLASSES, ExceptionInfo, Method, Param, Reference, TypeInfo, load_reference

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WHEEL = REPO / ".venv" / "reference" / "tinker-0.38.0-py3-none-any.whl"
README = REPO / "README.md"
UNSUPPORTED_HEADING = "### Not in this SDK"
# Clients users construct themselves; the others are built by the SDK from an internal holder.
USER_CONSTRUCTED = ("ServiceClient", "RestClient", "AdminClient")
_MISSING: Any = object()


# ---- the two sides -------------------------------------------------------------------------------------------


def wheel_path() -> Path:
    return Path(os.environ.get("TINKER_REFERENCE_WHEEL") or DEFAULT_WHEEL)


@functools.cache
def _load(path: Path) -> Reference:
    return load_reference(path)


def reference() -> Reference:
    path = wheel_path()
    if not path.is_file():
        pytest.fail(
            f"the Tinker 0.38.0 wheel is not at {path}. The Makefile downloads it; by hand:\n"
            f"  pip download tinker==0.38.0 --no-deps -d {DEFAULT_WHEEL.parent}\n"
            "or point TINKER_REFERENCE_WHEEL at a copy of it.",
            pytrace=False,
        )
    return _load(path)


def ours(key: str) -> Any:
    """Our object for a reference key: "types.X" in `tinker_client.types`, anything else at the top level."""
    module, _, name = key.rpartition(".")
    return getattr(our_types if module == "types" else tinker_client, name, _MISSING)


def unsupported_names(readme: Path = README) -> set[str]:
    """Backticked names opening the bullets of the README's `### Not in this SDK` section; none until it exists."""
    if not readme.is_file():
        return set()
    lines = readme.read_text().splitlines()
    starts = [index for index, line in enumerate(lines) if line.rstrip() == UNSUPPORTED_HEADING]
    names: set[str] = set()
    for line in lines[starts[0] + 1 :] if starts else []:
        if line.startswith("#"):
            break
        # A bullet opens with one or more backticked names, comma-separated, before its reason.
        match = re.match(r"\s*[-*]\s+((?:`[\w.]+`(?:,\s*)?)+)", line)
        if match:
            names.update(re.findall(r"`([\w.]+)`", match.group(1)))
    return names


# ---- differences ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    subject: str
    """Dotted name of what differs: "ServiceClient.close", "types.Checkpoint.public", "BillingError"."""
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


def allowed(difference: Difference, unsupported: set[str]) -> bool:
    """An unsupported name excuses itself and everything under it (`types.Foo` excuses `types.Foo.bar`)."""
    parts = difference.subject.split(".")
    return any(".".join(parts[:length]) in unsupported for length in range(1, len(parts) + 1))


def outstanding(differences: Iterable[Difference]) -> list[Difference]:
    unsupported = unsupported_names()
    return [difference for difference in differences if not allowed(difference, unsupported)]


def report(area: str, differences: list[Difference]) -> str:
    """One line per difference, a blank line between groups: the members of one client, type or exception."""
    lines = [f"{area}: {len(differences)} difference(s) from tinker 0.38"]
    group = None
    for difference in differences:
        current = difference.subject.rpartition(".")[0]
        if group is not None and current != group:
            lines.append("")
        group = current
        lines.append(f"  {difference}")
    return "\n".join(lines)


def assert_no_differences(area: str, differences: list[Difference]) -> None:
    left = outstanding(differences)
    if left:
        pytest.fail(report(area, left), pytrace=False)


# ---- annotations and defaults --------------------------------------------------------------------------------

_TYPING_GENERICS = {
    "List": "list",
    "Dict": "dict",
    "Tuple": "tuple",
    "Set": "set",
    "FrozenSet": "frozenset",
    "Type": "type",
}


class _Normalizer(ast.NodeTransformer):
    """Rewrites an annotation to one spelling: no module prefixes, builtin generics, `A | B | None` unions."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.expr:
        return ast.Name(_TYPING_GENERICS.get(node.attr, node.attr))  # types.X, tinker.X, typing.List -> X, list

    def visit_Name(self, node: ast.Name) -> ast.expr:
        return ast.Name(_TYPING_GENERICS.get(node.id, node.id))

    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        if isinstance(node.value, str):  # a forward reference: "ModelInput"
            return self.visit(ast.parse(node.value, mode="eval").body)
        return node

    def visit_Subscript(self, node: ast.Subscript) -> ast.expr:
        name = ast.unparse(node.value).split(".")[-1]
        if name == "Literal":
            return ast.Subscript(ast.Name("Literal"), node.slice)
        node = typing.cast(ast.Subscript, self.generic_visit(node))
        arguments = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if name == "Optional":
            return _union([*arguments, ast.Constant(None)])
        if name == "Union":
            return _union(arguments)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        node = typing.cast(ast.BinOp, self.generic_visit(node))
        return _union([node.left, node.right]) if isinstance(node.op, ast.BitOr) else node


def _union(members: list[ast.expr]) -> ast.expr:
    """Flattened, deduplicated and sorted (None last): member order means nothing in a union."""
    flat: dict[str, ast.expr] = {}
    for member in members:
        if isinstance(member, ast.BinOp) and isinstance(member.op, ast.BitOr):
            flat.update({ast.unparse(inner): inner for inner in _union_members(member)})
        else:
            flat[ast.unparse(member)] = member
    ordered = [flat[text] for text in sorted(flat, key=lambda text: (text == "None", text))]
    return functools.reduce(lambda left, right: ast.BinOp(left, ast.BitOr(), right), ordered)


def _union_members(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_members(node.left) + _union_members(node.right)
    return [node]


def normalize_annotation(annotation: str | None) -> str | None:
    """`Optional[types.List[int]]` and `list[int] | None` both give "list[int] | None"."""
    if annotation is None:
        return None
    try:
        tree = ast.parse(annotation, mode="eval").body
    except SyntaxError:
        return " ".join(annotation.split())
    return ast.unparse(ast.fix_missing_locations(_Normalizer().visit(tree)))


def _our_annotation(annotation: Any) -> str | None:
    if annotation is inspect.Signature.empty:
        return None
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


@dataclass(frozen=True)
class _Factory:
    """A default made by calling a non-builtin factory, compared by the factory's name."""

    name: str

    def __repr__(self) -> str:
        return f"{self.name}()"


_BUILTIN_FACTORIES: dict[str, Callable[[], Any]] = {"dict": dict, "list": list, "set": set, "tuple": tuple}


def _their_value(text: str) -> Any:
    """The value tinker's default source text stands for; `_Factory` for calls such as `AdamOptimizerConfig()`."""
    call = re.fullmatch(r"([\w.]+)\(\)", text)
    if call:
        name = call.group(1).split(".")[-1]
        return _BUILTIN_FACTORIES[name]() if name in _BUILTIN_FACTORIES else _Factory(name)
    try:
        return _constant(ast.parse(text, mode="eval").body)
    except (ValueError, SyntaxError):
        return _Factory(text)


_ARITHMETIC: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda left, right: left + right,
    ast.Sub: lambda left, right: left - right,
    ast.Mult: lambda left, right: left * right,
    ast.Pow: lambda left, right: left**right,
}


def _constant(node: ast.expr) -> Any:
    """A literal, or arithmetic on literals such as `10 * 1024 * 1024`; ValueError for anything else."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _ARITHMETIC[type(node.op)](_constant(node.left), _constant(node.right))
    return ast.literal_eval(node)


def _our_value(value: Any) -> Any:
    """Our default as comparable to `_their_value`: a default-constructed instance becomes `_Factory`."""
    if type(value).__module__ != "builtins" and not isinstance(value, enum.Enum):
        try:
            if value == type(value)():
                return _Factory(type(value).__name__)
        except Exception:  # not constructible without arguments, or no single truth value
            pass
    return value


def same_default(theirs: str | None, our_default: Any) -> bool:
    """None / `inspect.Parameter.empty` mean required. Values compare by value and kind (True is not 1)."""
    if theirs is None or our_default is inspect.Parameter.empty:
        return theirs is None and our_default is inspect.Parameter.empty
    their_value, our_value = _their_value(theirs), _our_value(our_default)
    try:
        return (isinstance(their_value, bool) == isinstance(our_value, bool)) and bool(their_value == our_value)
    except Exception:  # e.g. a numpy array: no single truth value
        return False


def _show_default(default: str | None) -> str:
    return "required" if default is None else f"default {default}"


def _show_our_default(default: Any) -> str:
    return "required" if default is inspect.Parameter.empty else f"default {_our_value(default)!r}"


# ---- methods -------------------------------------------------------------------------------------------------

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def _our_member(cls: type, name: str) -> tuple[str, Any]:
    """(kind, function) of `cls.name` as defined by `cls` or a base other than `object`; ("missing", None) if none."""
    for owner in cls.__mro__:
        if owner is object or name not in vars(owner):
            continue
        member = vars(owner)[name]
        if isinstance(member, property):
            return "property", member.fget
        if isinstance(member, functools.cached_property):
            return "property", member.func
        if isinstance(member, staticmethod):
            return "staticmethod", member.__func__
        if isinstance(member, classmethod):
            return "classmethod", member.__func__
        if inspect.isfunction(member):
            return "method", member
        return "attribute", member
    return "missing", None


_KIND_PHRASES = {
    "method": "a method",
    "property": "a property",
    "classmethod": "a classmethod",
    "staticmethod": "a staticmethod",
    "attribute": "a plain attribute",
}


def _our_params(kind: str, function: Any) -> list[inspect.Parameter]:
    parameters = list(inspect.signature(function).parameters.values())
    return parameters if kind == "staticmethod" else parameters[1:]


def _same_kind(theirs: str, ours: str) -> bool:
    # A classmethod and a staticmethod are called the same way.
    class_level = ("classmethod", "staticmethod")
    return theirs == ours or (theirs in class_level and ours in class_level)


def method_differences(subject: str, theirs: Method, cls: type, *, compare_returns: bool) -> list[Difference]:
    kind, function = _our_member(cls, theirs.name)
    if theirs.kind == "property" and theirs.name in _our_fields(cls):
        return []  # a field reads like a property
    if kind == "missing":
        return [Difference(subject, f"missing {theirs.kind}{' (async)' if theirs.is_async else ''}")]
    if not _same_kind(theirs.kind, kind):
        return [Difference(subject, f"is a {theirs.kind} in tinker, ours is {_KIND_PHRASES[kind]}")]
    if theirs.name.startswith("__") and theirs.name != "__init__":
        return []  # a protocol (with, await, pickle): being there is what counts
    differences = []
    our_async = inspect.iscoroutinefunction(inspect.unwrap(function))
    if kind != "property" and theirs.is_async != our_async:
        differences.append(
            f"is {'async' if theirs.is_async else 'sync'} in tinker, {'async' if our_async else 'sync'} in ours"
        )
    if kind != "property":
        differences += param_differences(theirs.params, _our_params(kind, function))
    if compare_returns and theirs.name != "__init__":
        their_returns = normalize_annotation(theirs.returns)
        our_returns = normalize_annotation(_our_annotation(inspect.signature(function).return_annotation))
        if not compatible_returns(their_returns, our_returns):
            differences.append(f"returns {their_returns}, ours {our_returns}")
    return [Difference(subject, message) for message in differences]


# Names both SDKs use for what the same call returns: transformers' AutoTokenizer gives a
# PreTrainedTokenizerBase subclass, which tinker annotates by the name of its slow subclass.
_SAME_TYPES = {"PreTrainedTokenizerBase": "PreTrainedTokenizer"}


def compatible_returns(theirs: str | None, ours: str | None) -> bool:
    """Equal once normalised, or ours narrower: every member of our union is one of tinker's."""
    if ours is not None:
        ours = _SAME_TYPES.get(ours, ours)
    if theirs == ours or theirs is None or ours is None:
        return theirs == ours
    their_members = {ast.unparse(node) for node in _union_members(ast.parse(theirs, mode="eval").body)}
    our_members = {ast.unparse(node) for node in _union_members(ast.parse(ours, mode="eval").body)}
    return our_members <= their_members


def param_differences(theirs: tuple[Param, ...], ours: list[inspect.Parameter]) -> list[str]:
    # Parameters named `_x` are internal plumbing (RestClient(_holder)); callers never pass them.
    their_params = [param for param in theirs if not param.name.startswith("_")]
    our_params = {param.name: param for param in ours if not param.name.startswith("_")}
    differences = _variadic_differences(their_params, list(our_params.values()))
    named = [param for param in their_params if param.kind in ("positional", "keyword-only")]
    for param in named:
        our_param = our_params.get(param.name)
        if our_param is None:
            differences.append(f"missing {param.kind} parameter {param.name} ({_show_default(param.default)})")
            continue
        if _KINDS[our_param.kind] != param.kind:
            differences.append(f"parameter {param.name} is {param.kind} in tinker, {_KINDS[our_param.kind]} in ours")
        # A default where tinker has none keeps every tinker call valid.
        if param.default is not None and not same_default(param.default, our_param.default):
            differences.append(
                f"parameter {param.name}: {_show_default(param.default)} in tinker, "
                f"{_show_our_default(our_param.default)} in ours"
            )
    differences += _order_differences(named, list(our_params.values()))
    differences += _extra_differences({param.name for param in named}, list(our_params.values()))
    return differences


def _variadic_differences(theirs: list[Param], ours: list[inspect.Parameter]) -> list[str]:
    differences = []
    for kind in ("*args", "**kwargs"):
        their_has = any(param.kind == kind for param in theirs)
        our_has = any(_KINDS[param.kind] == kind for param in ours)
        if their_has and not our_has:
            differences.append(f"missing {kind}")
        elif our_has and not their_has:
            differences.append(f"takes {kind}, tinker does not")
    return differences


def _order_differences(theirs: list[Param], ours: list[inspect.Parameter]) -> list[str]:
    """Positional parameters that both sides have must come in the same order (callers pass them by position)."""
    their_order = [param.name for param in theirs if param.kind == "positional"]
    our_order = [param.name for param in ours if _KINDS[param.kind] == "positional" and param.name in their_order]
    common = [name for name in their_order if name in our_order]
    if common != our_order:
        return [f"positional parameters in another order: tinker ({', '.join(common)}), ours ({', '.join(our_order)})"]
    return []


def _extra_differences(their_names: set[str], ours: list[inspect.Parameter]) -> list[str]:
    differences = []
    for param in ours:
        if param.name in their_names or _KINDS[param.kind] in ("*args", "**kwargs"):
            continue
        if param.kind != inspect.Parameter.KEYWORD_ONLY:
            differences.append(f"extra positional parameter {param.name} (only keyword-only ones may be added)")
        elif param.default is inspect.Parameter.empty:
            differences.append(f"extra keyword-only parameter {param.name} has no default")
    return differences


# ---- clients -------------------------------------------------------------------------------------------------


def client_differences(reference: Reference) -> list[Difference]:
    differences = []
    for name in CLIENT_CLASSES:
        cls = ours(name)
        if cls is _MISSING:
            differences.append(Difference(name, "missing client class"))
            continue
        for method in reference.clients[name].values():
            if method.name == "__init__" and name not in USER_CONSTRUCTED:
                continue  # built by the SDK from an internal holder: the signature is no API
            differences += method_differences(f"{name}.{method.name}", method, cls, compare_returns=True)
    return differences


# ---- types ---------------------------------------------------------------------------------------------------


def type_differences(reference: Reference) -> list[Difference]:
    differences = []
    for key, info in reference.types.items():
        obj = ours(key)
        if obj is _MISSING:
            origin = f" (tinker re-exports {info.source})" if info.kind == "external" else ""
            differences.append(Difference(key, f"missing {info.kind}{origin}"))
        elif info.kind == "alias":
            differences += _alias_differences(key, info, obj)
        elif info.kind == "enum":
            differences += _enum_differences(key, info, obj)
        elif info.kind == "class":
            differences += _class_differences(key, info, obj)
    return differences


def _our_literals(obj: Any) -> list[object]:
    """The values of every `Literal[...]` in a runtime type (through unions, Annotated and `type X = ...`)."""
    value = getattr(obj, "__value__", obj)  # a `type X = ...` alias
    if typing.get_origin(value) is typing.Literal:
        return list(typing.get_args(value))
    return [literal for argument in typing.get_args(value) for literal in _our_literals(argument)]


def _alias_differences(key: str, info: TypeInfo, obj: Any) -> list[Difference]:
    if not info.literals:
        return []
    our_values = _our_literals(obj)
    if not our_values:
        return [Difference(key, f"is {info.source} in tinker, ours is not a Literal")]
    differences = [
        Difference(key, f"lacks literal value {value!r}") for value in info.literals if value not in our_values
    ]
    differences += [
        Difference(key, f"has literal value {value!r} that tinker lacks")
        for value in our_values
        if value not in info.literals
    ]
    return differences


def _enum_differences(key: str, info: TypeInfo, obj: Any) -> list[Difference]:
    if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        return [Difference(key, "is an enum in tinker, not in ours")]
    members = list(obj.__members__)
    differences = [Difference(key, f"lacks member {member}") for member in info.members if member not in members]
    return differences + [
        Difference(key, f"has member {member} that tinker lacks") for member in members if member not in info.members
    ]


def _our_fields(cls: type) -> set[str]:
    fields = set(getattr(cls, "model_fields", {}))  # pydantic
    if dataclasses.is_dataclass(cls):
        fields |= {field.name for field in dataclasses.fields(cls)}
    for owner in cls.__mro__:
        fields |= set(vars(owner).get("__annotations__", {}))
    return fields


def _constructor(cls: type) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return {}


def _our_field_default(cls: type, parameter: inspect.Parameter) -> Any:
    """The parameter's default, with dataclass and pydantic default factories resolved."""
    factory = None
    if dataclasses.is_dataclass(cls):
        factory = {field.name: field.default_factory for field in dataclasses.fields(cls)}.get(parameter.name)
    model_field = getattr(cls, "model_fields", {}).get(parameter.name)
    if model_field is not None and model_field.default_factory is not None:
        factory = model_field.default_factory
    if factory is None or factory is dataclasses.MISSING:
        return parameter.default
    return factory() if factory in _BUILTIN_FACTORIES.values() else _Factory(getattr(factory, "__name__", "factory"))


def _field_default_differences(
    subject: str, theirs: str | None, cls: type, param: inspect.Parameter
) -> list[Difference]:
    our_default = _our_field_default(cls, param)
    if same_default(theirs, our_default):
        return []
    return [Difference(subject, f"{_show_default(theirs)} in tinker, {_show_our_default(our_default)} in ours")]


def _class_differences(key: str, info: TypeInfo, cls: Any) -> list[Difference]:
    if not isinstance(cls, type):
        return [Difference(key, f"is a class in tinker, ours is {cls!r}")]
    differences = []
    fields, constructor = _our_fields(cls), _constructor(cls)
    for field in info.fields:
        subject = f"{key}.{field.name}"
        if field.name not in fields and _our_member(cls, field.name)[0] == "missing":
            differences.append(Difference(subject, f"missing field ({_show_default(field.default)})"))
        elif info.has_own_init or not field.in_init:
            continue  # tinker's own __init__ is compared as a method below
        elif field.name not in constructor:
            differences.append(Difference(subject, "is a constructor argument in tinker, not in ours"))
        else:
            differences += _field_default_differences(subject, field.default, cls, constructor[field.name])
    for method in info.methods:
        differences += method_differences(f"{key}.{method.name}", method, cls, compare_returns=False)
    return differences


# ---- top-level names and exceptions --------------------------------------------------------------------------


def top_level_differences(reference: Reference) -> list[Difference]:
    return [
        Difference(name, "missing top-level name") for name in reference.top_level if not hasattr(tinker_client, name)
    ]


def _self_assignments(function: Any) -> set[str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError):
        return set()
    names = set()
    for node in ast.walk(tree):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names |= {
            target.attr
            for target in targets
            if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self"
        }
    return names


def our_exception_attributes(cls: type) -> set[str]:
    """Public attributes: class annotations and attributes, and what `__init__` sets on self, inherited included."""
    attributes: set[str] = set()
    for owner in cls.__mro__:
        if not owner.__module__.startswith("tinker_client"):
            continue
        attributes |= set(vars(owner).get("__annotations__", {}))
        attributes |= {
            name for name, value in vars(owner).items() if not callable(value) or isinstance(value, property)
        }
        if "__init__" in vars(owner):
            attributes |= _self_assignments(vars(owner)["__init__"])
    return {name for name in attributes if not name.startswith("_")}


def exception_differences(reference: Reference) -> list[Difference]:
    differences = []
    for name, info in reference.exceptions.items():
        cls = ours(name)
        if cls is _MISSING:
            differences.append(Difference(name, f"missing exception ({' -> '.join(info.chain)})"))
        elif not (isinstance(cls, type) and issubclass(cls, BaseException)):
            differences.append(Difference(name, "is an exception in tinker, not in ours"))
        else:
            differences += _exception_class_differences(info, cls)
    return differences


def _exception_class_differences(info: ExceptionInfo, cls: type) -> list[Difference]:
    differences = []
    chain = tuple(base.__name__ for base in cls.__mro__[1:] if base not in (BaseException, object))
    if chain != info.chain:
        differences.append(
            Difference(info.name, f"inherits {' -> '.join(info.chain)} in tinker, {' -> '.join(chain)} in ours")
        )
    attributes = our_exception_attributes(cls)
    for attribute, default in info.attributes.items():
        subject = f"{info.name}.{attribute}"
        if attribute not in attributes:
            suffix = f" (class default {default})" if default is not None else ""
            differences.append(Difference(subject, f"missing attribute{suffix}"))
        elif default is not None and not same_default(default, getattr(cls, attribute, _MISSING)):
            differences.append(
                Difference(subject, f"is {default} in tinker, {getattr(cls, attribute, None)!r} in ours")
            )
    return differences


# ---- the tests -----------------------------------------------------------------------------------------------

AREAS: dict[str, Callable[[Reference], list[Difference]]] = {
    "clients": client_differences,
    "types": type_differences,
    "top-level names": top_level_differences,
    "exceptions": exception_differences,
}


def test_clients_have_tinkers_methods_and_signatures() -> None:
    assert_no_differences("clients", client_differences(reference()))


def test_types_have_tinkers_fields_defaults_and_methods() -> None:
    assert_no_differences("types", type_differences(reference()))


def test_top_level_exports_every_name_of_tinker() -> None:
    assert_no_differences("top-level names", top_level_differences(reference()))


def test_exceptions_match_tinkers_hierarchy_and_attributes() -> None:
    assert_no_differences("exceptions", exception_differences(reference()))


def test_the_reference_is_read_from_the_wheel() -> None:
    """Guards the other tests against passing on an empty reading of the wheel."""
    loaded = reference()
    custom = loaded.clients["TrainingClient"]["forward_backward_custom"]
    assert Param("loss_type_input", "keyword-only", "None", "Literal['logprobs'] | None") in custom.params
    assert loaded.clients["SamplingClient"]["sample_async"].is_async
    adam = {field.name: field.default for field in loaded.types["types.AdamParams"].fields}
    assert adam["learning_rate"] == "0.0001"
    assert {field.name: field.default for field in loaded.types["types.Datum"].fields}["loss_fn_inputs"] == "dict()"
    assert loaded.types["types.CheckpointType"].literals == ("training", "sampler", "external")
    assert loaded.exceptions["BadRequestError"].attributes["status_code"] == "400"
    assert len(loaded.top_level) > 50 and len(loaded.types) > 150


def test_defaults_compare_by_value() -> None:
    assert same_default("0.0001", 1e-4)
    assert same_default("dict()", {})
    assert same_default("10 * 1024 * 1024", 10485760)
    assert same_default(None, inspect.Parameter.empty)
    assert not same_default("1", True)
    assert not same_default("None", inspect.Parameter.empty)


def test_unsupported_names_come_from_the_readme_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "## Usage\n- `types.NotThis`: another section\n"
        f"{UNSUPPORTED_HEADING}\n\n- `types.TelemetryEvent`: telemetry wire type\n* `ServiceClient.holder`: internal\n"
        "- `Timeout`, `RequestOptions`: HTTP settings, not `types.NotListed` here\n"
        "## Next\n- `types.Other`: after the section\n"
    )
    assert unsupported_names(readme) == {"types.TelemetryEvent", "ServiceClient.holder", "Timeout", "RequestOptions"}
    assert unsupported_names(tmp_path / "absent.md") == set()
    assert allowed(Difference("types.TelemetryEvent.events", "missing field"), {"types.TelemetryEvent"})
    assert not allowed(Difference("types.TelemetryEventX", "missing class"), {"types.TelemetryEvent"})


def test_ours_may_only_add_keyword_only_parameters_with_defaults() -> None:
    theirs = (Param("data", "positional", None, None), Param("loss_fn", "keyword-only", "'ppo'", None))

    def compatible(data: object, *, loss_fn: str = "ppo", extra: int = 0) -> None: ...

    def reordered(loss_fn: str = "ppo", data: object = None, *, extra: int) -> None: ...

    assert param_differences(theirs, list(inspect.signature(compatible).parameters.values())) == []
    # A default where tinker requires the argument keeps tinker's calls valid: not a difference.
    assert param_differences(theirs, list(inspect.signature(reordered).parameters.values())) == [
        "parameter loss_fn is keyword-only in tinker, positional in ours",
        "extra keyword-only parameter extra has no default",
    ]


def test_annotations_are_compared_in_one_spelling() -> None:
    assert normalize_annotation("Optional[types.List[int]]") == "list[int] | None"
    assert normalize_annotation("Union[None, tinker.Foo, Dict[str, 'Bar']]") == "Foo | dict[str, Bar] | None"
    assert normalize_annotation("APIFuture[  types.SampleResponse ]") == "APIFuture[SampleResponse]"
    assert normalize_annotation("Literal['a', 'b']") == "Literal['a', 'b']"


def main(argv: list[str]) -> None:
    """Writes the full report of every area (to the file named, else stdout)."""
    loaded = reference()
    text = "\n\n".join(report(area, outstanding(differences(loaded))) for area, differences in AREAS.items()) + "\n"
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv)
