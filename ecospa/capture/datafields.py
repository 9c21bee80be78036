"""Plain dataclass arguments of a call, flattened into their fields for a capture and rebuilt around it.

Research code hands its attention modules small dataclasses of tensors: x-transformers passes each
``Attention`` its ``cache=`` as an ``Intermediates`` holding ``cached_kv`` (the past keys and values)
and gets a new one back. pytree does not know such a class, so a call carrying one could not be
captured. A *plain* dataclass instance (:func:`refusal` is None: every field a tensor, None, a
plain value, or a tuple of those, and no attribute besides its fields) is a container instead:

- :func:`as_nodes` replaces it by a :class:`DataFields` wrapper, a pytree node ecospa registers
  (:func:`register`, lazily, at the first such argument: ``import ecospa`` registers nothing). Its
  fields become the call's leaves (tensors: graph inputs; plain values: constants of the call's
  signature), its class and field names the node's context (part of the argument structure:
  another class or field set is another signature).
- ``tree_unflatten`` of such a spec gives back an object of the user's class (not the wrapper),
  made with ``cls.__new__`` and the fields set one by one (no ``__init__``/``__post_init__``
  side effects; frozen and slotted classes too), so the traced forward sees the class it expects.
- :func:`watch` records the objects rebuilt inside it, and :func:`assigned` says which of their
  fields the forward assigned: a graph run does not repeat such an assignment, so the capture is
  refused (an in-place write into a tensor field is an input mutation, which export reports).

The user's class itself is never registered with pytree: code outside ecospa that walks pytrees
(``torch.compile``, the user's own ``tree_map``) sees it as before. An object holding state a graph
cannot update (a module, a list the callee appends to, a dict, another object) is refused, with
the field at fault named.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree

__all__ = ["DataFields", "register", "refusal", "is_dataclass_instance", "as_nodes", "watch", "assigned"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
          torch.layout, type(Ellipsis))


def is_dataclass_instance(v: Any) -> bool:
    """True for an instance (not the class) of a dataclass."""
    return hasattr(type(v), "__dataclass_fields__") and not isinstance(v, type)


def _plain(v: Any) -> bool:
    """A tensor, None, a plain value, or a plain tuple of those (recursively)."""
    if isinstance(v, torch.Tensor) or isinstance(v, _PLAIN):
        return True
    return type(v) is tuple and all(_plain(x) for x in v)


def refusal(obj: Any) -> str | None:
    """Why the dataclass instance ``obj`` cannot be flattened into its fields (None: it can)."""
    name = type(obj).__name__
    fields = dataclasses.fields(obj)
    names = {f.name for f in fields}
    extra = sorted(k for k in getattr(obj, "__dict__", {}) if k not in names)
    if extra:
        return (f"an argument of type {name} with attribute {extra[0]!r} that is not a dataclass field "
                "(Python-side state the graph cannot update)")
    for f in fields:
        if not hasattr(obj, f.name):
            return f"an argument of type {name} whose field {f.name!r} is not set"
        v = getattr(obj, f.name)
        if not _plain(v):
            return (f"an argument of type {name} whose field {f.name!r} holds a {type(v).__name__} (Python-side "
                    "state such as a module or a list the callee appends to: the graph cannot update it)")
    return None


class DataFields:
    """A plain dataclass instance as a pytree node: its field values are the children, ``(class,
    field names)`` the context. Unflattening gives back an instance of the class itself."""

    __slots__ = ("cls", "names", "values")

    def __init__(self, obj: Any):
        self.cls = type(obj)
        self.names = tuple(f.name for f in dataclasses.fields(obj))
        self.values = [getattr(obj, n) for n in self.names]


# objects rebuilt inside watch(): (object, {field name: value it was given})
_WATCHED: list[list[tuple[Any, dict[str, Any]]]] = []


def _rebuild(values, context) -> Any:
    cls, names = context
    obj = cls.__new__(cls)
    for n, v in zip(names, values):
        object.__setattr__(obj, n, v)
    if _WATCHED:
        _WATCHED[-1].append((obj, dict(zip(names, values))))
    return obj


def _flatten(node: DataFields) -> tuple[list, tuple]:
    return list(node.values), (node.cls, node.names)


def _flatten_with_keys(node: DataFields) -> tuple[list, tuple]:
    return [(pytree.GetAttrKey(n), v) for n, v in zip(node.names, node.values)], (node.cls, node.names)


_REGISTERED: list[bool] = []


def register() -> None:
    """Make :class:`DataFields` a pytree node (once)."""
    if _REGISTERED:
        return
    if DataFields not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(DataFields, _flatten, _rebuild, flatten_with_keys_fn=_flatten_with_keys,
                                    serialized_type_name="ecospa.DataFields")
    _REGISTERED.append(True)


def as_nodes(tree: Any) -> tuple[Any, str | None]:
    """``(tree with every plain dataclass instance among its leaves wrapped in DataFields, None)``,
    or ``(tree, reason)`` for the first dataclass instance that is not plain (:func:`refusal`)."""
    register()
    reasons: list[str] = []

    def wrap(v: Any) -> Any:
        if not is_dataclass_instance(v):
            return v
        why = refusal(v)
        if why is not None:
            reasons.append(why)
            return v
        return DataFields(v)
    out = pytree.tree_map(wrap, tree)
    return (tree, reasons[0]) if reasons else (out, None)


@contextlib.contextmanager
def watch() -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Records the dataclass objects rebuilt (unflattened) inside the block, with their field values."""
    made: list[tuple[Any, dict[str, Any]]] = []
    _WATCHED.append(made)
    try:
        yield made
    finally:
        _WATCHED.pop()


def assigned(made: list[tuple[Any, dict[str, Any]]]) -> str | None:
    """The first field (as ``"Class.field"``) that a forward assigned on one of the objects
    :func:`watch` recorded (a new value, or an attribute added), or None."""
    for obj, given in made:
        now = getattr(obj, "__dict__", None)
        for n, v in given.items():
            if getattr(obj, n, _GONE) is not v:
                return f"{type(obj).__name__}.{n}"
        if now is not None:
            for n in now:
                if n not in given:
                    return f"{type(obj).__name__}.{n}"
    return None


_GONE = object()
