"""The public API of the Tinker SDK, read statically from its wheel: the wheel is parsed, never imported.

>>> reference = load_reference(Path(".venv/reference/tinker-0.38.0-py3-none-any.whl"))
>>> [param.name for param in reference.clients["TrainingClient"]["optim_step"].params]
['optim_params', 'adam_params']
"""

from __future__ import annotations

import ast
import zipfile
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

CLIENT_CLASSES = ("ServiceClient", "TrainingClient", "SamplingClient", "RestClient", "AdminClient", "APIFuture")
# Where the clients live; tinker/__init__.py re-exports them from here.
CLIENTS_MODULE = "tinker.lib.public_interfaces"
TYPES_MODULE = "tinker.types"
EXCEPTIONS_MODULE = "tinker._exceptions"

# Dunder methods that are part of a class's behaviour (construction, `with`, `await`, pickling).
PROTOCOL_DUNDERS = (
    "__init__",
    "__enter__",
    "__exit__",
    "__aenter__",
    "__aexit__",
    "__await__",
    "__call__",
    "__reduce__",
)
# Pydantic hooks with public names that are not API: they run inside validation and serialisation.
VALIDATOR_DECORATORS = ("field_validator", "model_validator", "field_serializer", "model_serializer", "validator")
ENUM_BASES = ("Enum", "StrEnum", "IntEnum", "Flag", "IntFlag")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    """"positional", "keyword-only", "*args" or "**kwargs"."""
    default: str | None
    """Source text of the default; None when the parameter is required."""
    annotation: str | None


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    """"method", "classmethod", "staticmethod" or "property"."""
    is_async: bool
    params: tuple[Param, ...]
    """Without `self` / `cls`."""
    returns: str | None
    deprecated: bool = False


@dataclass(frozen=True)
class Field:
    name: str
    default: str | None
    """Source text of the effective default: `Field(default=3)` gives "3", `field(default_factory=dict)` gives
    "dict()"; None when the field is required."""
    annotation: str
    in_init: bool = True


@dataclass(frozen=True)
class TypeInfo:
    name: str
    kind: str
    """"class", "enum", "alias" (a module-level `X = ...` that is not a class), "external" (re-exported from
    another package) or "module"."""
    fields: tuple[Field, ...] = ()
    methods: tuple[Method, ...] = ()
    has_own_init: bool = False
    """The class (or a base in the wheel) defines `__init__`, so its signature, not the fields, is the constructor."""
    literals: tuple[object, ...] = ()
    """For an alias: the values of every `Literal[...]` in it, following aliases it names."""
    members: tuple[str, ...] = ()
    """For an enum: its member names."""
    source: str = ""
    """For an alias: its source text; for an external name: where it comes from."""


@dataclass(frozen=True)
class ExceptionInfo:
    name: str
    chain: tuple[str, ...]
    """Base classes by name, nearest first, up to (not including) BaseException."""
    attributes: dict[str, str | None]
    """Public attributes (class annotations, class attributes, `self.x = ...` in `__init__`), inherited included,
    with the source text of a class-level default (e.g. status_code: "400"), else None."""


@dataclass(frozen=True)
class Reference:
    top_level: tuple[str, ...]
    """`tinker.__all__`."""
    clients: dict[str, dict[str, Method]]
    types: dict[str, TypeInfo]
    """Keyed "types.X" for `tinker.types` exports, "X" for types only `tinker/__init__.py` exports."""
    exceptions: dict[str, ExceptionInfo]


@dataclass(frozen=True)
class _Module:
    name: str
    tree: ast.Module
    is_package: bool


@dataclass(frozen=True)
class _Definition:
    """What a name refers to: a node in a module of the wheel, a submodule, or something outside the wheel."""

    module: _Module | None
    node: ast.AST | None = None
    external: str = ""


@dataclass
class _Wheel:
    sources: dict[str, str]
    """Module name -> source text."""
    packages: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, path: Path) -> _Wheel:
        wheel = cls(sources={})
        with zipfile.ZipFile(path) as archive:
            for entry in archive.namelist():
                if not entry.endswith(".py"):
                    continue
                parts = entry[: -len(".py")].split("/")
                if parts[-1] == "__init__":
                    parts.pop()
                    wheel.packages.add(".".join(parts))
                wheel.sources[".".join(parts)] = archive.read(entry).decode()
        return wheel

    def module(self, name: str) -> _Module | None:
        if name not in self.sources:
            return None
        return _parse(self, name)


@cache
def _parse_source(source: str) -> ast.Module:
    return ast.parse(source)


def _parse(wheel: _Wheel, name: str) -> _Module:
    return _Module(name, _parse_source(wheel.sources[name]), name in wheel.packages)


def load_reference(wheel_path: Path) -> Reference:
    wheel = _Wheel.open(wheel_path)
    top = wheel.module("tinker")
    types_module = wheel.module(TYPES_MODULE)
    assert top is not None and types_module is not None, f"{wheel_path} is not a tinker wheel"
    top_level = _dunder_all(top)
    return Reference(
        top_level=top_level,
        clients={name: _client_methods(wheel, name) for name in CLIENT_CLASSES},
        types=_types(wheel, top, types_module, top_level),
        exceptions=_exceptions(wheel),
    )


# ---- name resolution -------------------------------------------------------------------------------------------


def _dunder_all(module: _Module) -> tuple[str, ...]:
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and any(_is_name(target, "__all__") for target in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise ValueError(f"{module.name} has no __all__")


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _top_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module-level statements, including those under `if` / `try` (TYPE_CHECKING imports, optional deps)."""
    statements: list[ast.stmt] = []
    for node in body:
        statements.append(node)
        if isinstance(node, ast.If | ast.Try):
            statements += _top_statements(node.body) + _top_statements(node.orelse)
    return statements


def _absolute(module: _Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.name.split(".")
    if not module.is_package:
        parts.pop()
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _resolve(wheel: _Wheel, module: _Module, name: str) -> _Definition:
    """Follows re-exports (`from .x import Y as Y`) to the definition of `name` in `module`."""
    for node in reversed(_top_statements(module.tree.body)):
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            return _Definition(module, node)
        if isinstance(node, ast.Assign) and any(_is_name(target, name) for target in node.targets):
            return _Definition(module, node)
        if isinstance(node, ast.AnnAssign) and _is_name(node.target, name) and node.value is not None:
            return _Definition(module, node)
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _resolve_import(wheel, _absolute(module, node), alias.name)
    raise LookupError(f"{name} is not defined in {module.name}")


def _resolve_import(wheel: _Wheel, source: str, name: str) -> _Definition:
    submodule = wheel.module(f"{source}.{name}")
    if submodule is not None:
        return _Definition(submodule)
    module = wheel.module(source)
    if module is None:
        return _Definition(None, external=f"{source}.{name}")
    return _resolve(wheel, module, name)


@cache
def _import_aliases(module: _Module) -> dict[str, str]:
    """`from x import Future as ConcurrentFuture` -> {"ConcurrentFuture": "Future"}: annotations use the real name."""
    aliases: dict[str, str] = {}
    for node in _top_statements(module.tree.body):
        if isinstance(node, ast.ImportFrom):
            aliases.update({alias.asname: alias.name for alias in node.names if alias.asname})
    return aliases


def _source(module: _Module, node: ast.expr | None) -> str | None:
    if node is None:
        return None
    aliases = _import_aliases(module)

    class Unalias(ast.NodeTransformer):
        def visit_Name(self, name: ast.Name) -> ast.Name:
            return ast.Name(aliases.get(name.id, name.id), name.ctx)

    return ast.unparse(Unalias().visit(_copy(node)))


def _copy(node: ast.expr) -> ast.expr:
    return ast.parse(ast.unparse(node), mode="eval").body


def _base_definitions(wheel: _Wheel, module: _Module, node: ast.ClassDef) -> list[_Definition]:
    """The class's bases that are classes in the wheel, nearest first; `Generic[T]`-style subscripts unwrapped."""
    bases: list[_Definition] = []
    for base in node.bases:
        target = base.value if isinstance(base, ast.Subscript) else base
        if not isinstance(target, ast.Name):
            continue
        try:
            definition = _resolve(wheel, module, target.id)
        except LookupError:
            continue
        if isinstance(definition.node, ast.ClassDef):
            bases.append(definition)
    return bases


def _class_chain(wheel: _Wheel, module: _Module, node: ast.ClassDef) -> list[tuple[_Module, ast.ClassDef]]:
    """The class and its bases in the wheel, most basic first, so that subclasses override."""
    chain: list[tuple[_Module, ast.ClassDef]] = []
    for base in reversed(_base_definitions(wheel, module, node)):
        assert base.module is not None and isinstance(base.node, ast.ClassDef)
        chain += [entry for entry in _class_chain(wheel, base.module, base.node) if entry not in chain]
    return [*chain, (module, node)]


# ---- methods ---------------------------------------------------------------------------------------------------


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """`@deprecated("...")` -> "deprecated", `@x.setter` -> "setter"."""
    names = []
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        names.append(ast.unparse(target).split(".")[-1])
    return names


def _is_api_method(node: ast.stmt) -> bool:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    if node.name.startswith("_") and node.name not in PROTOCOL_DUNDERS:
        return False
    decorators = _decorator_names(node)
    return not any(name in (*VALIDATOR_DECORATORS, "overload", "setter", "deleter") for name in decorators)


def _method(module: _Module, node: ast.FunctionDef | ast.AsyncFunctionDef) -> Method:
    decorators = _decorator_names(node)
    kind = "method"
    for decorator, meaning in (("staticmethod", "staticmethod"), ("classmethod", "classmethod")):
        if decorator in decorators:
            kind = meaning
    if "property" in decorators or "cached_property" in decorators:
        kind = "property"
    params = _params(module, node.args)
    return Method(
        name=node.name,
        kind=kind,
        is_async=isinstance(node, ast.AsyncFunctionDef),
        params=params if kind == "staticmethod" else params[1:],
        returns=_source(module, node.returns),
        deprecated="deprecated" in decorators,
    )


def _params(module: _Module, args: ast.arguments) -> tuple[Param, ...]:
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [
        Param(arg.arg, "positional", _source(module, default), _source(module, arg.annotation))
        for arg, default in zip(positional, defaults, strict=True)
    ]
    if args.vararg:
        params.append(Param(args.vararg.arg, "*args", None, _source(module, args.vararg.annotation)))
    params += [
        Param(arg.arg, "keyword-only", _source(module, default), _source(module, arg.annotation))
        for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    if args.kwarg:
        params.append(Param(args.kwarg.arg, "**kwargs", None, _source(module, args.kwarg.annotation)))
    return tuple(params)


def _methods(wheel: _Wheel, module: _Module, node: ast.ClassDef) -> dict[str, Method]:
    """Public methods, inherited ones (from classes in the wheel) included, in definition order."""
    methods: dict[str, Method] = {}
    for owner_module, owner in _class_chain(wheel, module, node):
        for statement in owner.body:
            if _is_api_method(statement):
                assert isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef)
                methods[statement.name] = _method(owner_module, statement)
    return methods


def _client_methods(wheel: _Wheel, name: str) -> dict[str, Method]:
    package = wheel.module(CLIENTS_MODULE)
    assert package is not None
    definition = _resolve(wheel, package, name)
    assert definition.module is not None and isinstance(definition.node, ast.ClassDef)
    return _methods(wheel, definition.module, definition.node)


# ---- types -----------------------------------------------------------------------------------------------------


def _types(wheel: _Wheel, top: _Module, types_module: _Module, top_level: tuple[str, ...]) -> dict[str, TypeInfo]:
    described = {f"types.{name}": _describe(wheel, types_module, name) for name in _exported_names(types_module)}
    # Then the types only tinker/__init__.py exports: not clients, exceptions, modules or `tinker.types` names.
    for name in top_level:
        if name in CLIENT_CLASSES or name.startswith("__") or f"types.{name}" in described:
            continue
        definition = _resolve(wheel, top, name)
        info = _describe(wheel, top, name)
        is_exception = definition.module is not None and definition.module.name == EXCEPTIONS_MODULE
        if not (is_exception or info.kind == "module" or _is_backcompat_future(info)):
            described[name] = info
    return described


def _is_backcompat_future(info: TypeInfo) -> bool:
    # These subclass the clients with `*args, **kwargs` forwarders; the clients area covers their methods.
    return info.name.startswith("Backcompat")


def _exported_names(module: _Module) -> list[str]:
    """Names a package re-exports with `from .x import Y as Y` (the explicit re-export idiom)."""
    names = []
    for node in module.tree.body:
        if isinstance(node, ast.ImportFrom):
            names += [alias.asname for alias in node.names if alias.asname and not alias.asname.startswith("_")]
    return names


def _describe(wheel: _Wheel, module: _Module, name: str) -> TypeInfo:
    definition = _resolve(wheel, module, name)
    if definition.module is None:
        return TypeInfo(name, "external", source=definition.external)
    if definition.node is None:
        return TypeInfo(name, "module", source=definition.module.name)
    node = definition.node
    if isinstance(node, ast.ClassDef):
        return _describe_class(wheel, definition.module, node, name)
    assert isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
    if isinstance(node.value, ast.Name) and _names_class(wheel, definition.module, node.value.id):
        # `X = SomeClass`: X is that class under another name.
        return replace(_describe(wheel, definition.module, node.value.id), name=name)
    return TypeInfo(
        name,
        "alias",
        literals=tuple(_literals(wheel, definition.module, node.value)),
        source=_source(definition.module, node.value) or "",
    )


def _names_class(wheel: _Wheel, module: _Module, name: str) -> bool:
    try:
        return isinstance(_resolve(wheel, module, name).node, ast.ClassDef)
    except LookupError:  # a builtin, such as `ModelID = str`
        return False


def _literals(wheel: _Wheel, module: _Module, node: ast.expr) -> list[object]:
    """Values of the `Literal[...]`s in an alias, following names of other aliases in the wheel."""
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).split(".")[-1] == "Literal":
        elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return [element.value for element in elements if isinstance(element, ast.Constant)]
    if isinstance(node, ast.Name):
        try:
            definition = _resolve(wheel, module, node.id)
        except LookupError:
            return []
        if definition.module is not None and isinstance(definition.node, ast.Assign | ast.AnnAssign):
            value = definition.node.value
            return _literals(wheel, definition.module, value) if value is not None else []
        return []
    values: list[object] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr):
            values += _literals(wheel, module, child)
    return values


def _describe_class(wheel: _Wheel, module: _Module, node: ast.ClassDef, name: str) -> TypeInfo:
    chain = _class_chain(wheel, module, node)
    if any(ast.unparse(base).split(".")[-1] in ENUM_BASES for _, owner in chain for base in owner.bases):
        return TypeInfo(name, "enum", members=tuple(_enum_members(node)))
    methods = _methods(wheel, module, node)
    return TypeInfo(
        name,
        "class",
        fields=tuple(_fields(chain).values()),
        methods=tuple(methods.values()),
        has_own_init="__init__" in methods,
    )


def _enum_members(node: ast.ClassDef) -> list[str]:
    return [
        target.id
        for statement in node.body
        if isinstance(statement, ast.Assign)
        for target in statement.targets
        if isinstance(target, ast.Name) and not target.id.startswith("_")
    ]


def _fields(chain: list[tuple[_Module, ast.ClassDef]]) -> dict[str, Field]:
    """Annotated class attributes, bases first; private names and ClassVars are not fields."""
    fields: dict[str, Field] = {}
    for module, owner in chain:
        for statement in owner.body:
            if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
                continue
            name = statement.target.id
            annotation = _source(module, statement.annotation) or ""
            if name.startswith("_") or annotation.split("[")[0].split(".")[-1] == "ClassVar":
                continue
            default, in_init = _field_default(module, statement.value)
            fields[name] = Field(name, default, annotation, in_init)
    return fields


def _field_default(module: _Module, value: ast.expr | None) -> tuple[str | None, bool]:
    """The effective default of `x: T = value` and whether the field is a constructor argument."""
    is_field_call = isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in ("Field", "field")
    if not is_field_call:
        return _source(module, value), True
    assert isinstance(value, ast.Call)
    keywords = {keyword.arg: keyword.value for keyword in value.keywords if keyword.arg}
    in_init = not (isinstance(keywords.get("init"), ast.Constant) and keywords["init"].value is False)
    if "default_factory" in keywords:
        return f"{_source(module, keywords['default_factory'])}()", in_init
    default = keywords.get("default", value.args[0] if value.args else None)
    if default is None or ast.unparse(default) in ("...", "PydanticUndefined"):
        return None, in_init
    return _source(module, default), in_init


# ---- exceptions ------------------------------------------------------------------------------------------------


def _exceptions(wheel: _Wheel) -> dict[str, ExceptionInfo]:
    module = wheel.module(EXCEPTIONS_MODULE)
    assert module is not None
    classes = {node.name: node for node in module.tree.body if isinstance(node, ast.ClassDef)}
    return {
        name: ExceptionInfo(
            name, tuple(_exception_chain(classes, name)[1:]), _exception_attributes(module, classes, name)
        )
        for name in classes
        if not name.startswith("_")
    }


def _exception_chain(classes: dict[str, ast.ClassDef], name: str) -> list[str]:
    """`name` and its bases, nearest first (single inheritance, as in tinker/_exceptions.py)."""
    chain = [name]
    while chain[-1] in classes and classes[chain[-1]].bases:
        chain.append(ast.unparse(classes[chain[-1]].bases[0]).split(".")[-1])
    return [entry for entry in chain if entry != "BaseException"]


def _exception_attributes(module: _Module, classes: dict[str, ast.ClassDef], name: str) -> dict[str, str | None]:
    attributes: dict[str, str | None] = {}
    for owner in reversed([entry for entry in _exception_chain(classes, name) if entry in classes]):
        for attribute, default in _own_attributes(module, classes[owner]):
            if default is not None or attribute not in attributes:
                attributes[attribute] = default
    return attributes


def _own_attributes(module: _Module, node: ast.ClassDef) -> list[tuple[str, str | None]]:
    attributes: list[tuple[str, str | None]] = []
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            attributes.append((statement.target.id, _source(module, statement.value)))
        elif isinstance(statement, ast.Assign):
            attributes += [
                (target.id, _source(module, statement.value))
                for target in statement.targets
                if isinstance(target, ast.Name)
            ]
        elif isinstance(statement, ast.FunctionDef) and statement.name == "__init__":
            attributes += [(attribute, None) for attribute in _self_assignments(statement)]
    return [(attribute, default) for attribute, default in attributes if not attribute.startswith("_")]


def _self_assignments(function: ast.FunctionDef) -> list[str]:
    """Names of `self.x = ...` / `self.x: T = ...` in a method."""
    names = []
    for node in ast.walk(function):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names += [
            target.attr for target in targets if isinstance(target, ast.Attribute) and _is_name(target.value, "self")
        ]
    return names
