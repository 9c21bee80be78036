"""Argument classes of torch itself that ``torch.export`` cannot take as they come, made pytree nodes.

An attention forward may be handed an object of a class torch defines but does not register with
``torch.utils._pytree``: FlexAttention's ``BlockMask`` (``torch.nn.attention.flex_attention``),
which torchtitan builds once per batch and passes down to every attention layer. Export then
refuses the call ("Unsupported input type"). Such a class flattens itself already (its own
``_flatten`` / ``_unflatten``: its tensors as leaves, the constant metadata in the context:
sequence lengths, block size, the mask function with its closure tensors lifted to leaves and
compared by value). :func:`register_argument_types` registers each class of :data:`KNOWN` with
those methods, unless torch (or the user) registered it already, so that:

- ``torch.export`` takes the object as an input (its tensors become graph inputs; the metadata
  is part of the input structure, so a call with other metadata is another capture);
- ``ecospa.narrow.program.signature`` holds its metadata in the signature's argument structure and
  its tensors as the call's tensors, and rebuilds the object around the graph
  (:func:`rebuildable` lists the classes it may rebuild: plain data, no state a graph must update).

Registered before a call's arguments are flattened, once the class's module is imported (by the
user's code: ``import ecospa`` imports no such module); registering changes nothing for code that
never meets the class.
"""
from __future__ import annotations

import sys

import torch.utils._pytree as pytree

__all__ = ["KNOWN", "register_argument_types", "rebuildable"]

#: ``(module, class name)`` of torch's own argument classes made pytree nodes: plain data (tensors
#: and constants), each with ``_flatten``, ``_unflatten`` and ``_flatten_with_keys`` methods.
KNOWN: tuple[tuple[str, str], ...] = (
    ("torch.nn.attention.flex_attention", "BlockMask"),
)

_REGISTERED: dict[tuple[str, str], type] = {}
_ALL: list[tuple[type, ...]] = [()]


def _known_class(module: str, name: str) -> type | None:
    """The class, where its module is imported already (an object of it cannot exist before, and
    ``import ecospa`` loads nothing of torch it does not need), and has the methods to flatten it."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    if cls is None or not all(hasattr(cls, m) for m in ("_flatten", "_unflatten", "_flatten_with_keys")):
        return None
    return cls


def register_argument_types() -> tuple[type, ...]:
    """Register every class of :data:`KNOWN` whose module is imported as a pytree node (those
    registered already, by torch or the user, are left as they are); returns the classes
    registered so far. Cheap once all are: it runs before every flattening of a call's arguments."""
    if len(_REGISTERED) == len(KNOWN):
        return _ALL[0]
    for key in KNOWN:
        if key in _REGISTERED:
            continue
        cls = _known_class(*key)
        if cls is None:
            continue
        if cls not in pytree.SUPPORTED_NODES:
            try:
                pytree.register_pytree_node(cls, cls._flatten, cls._unflatten,
                                            flatten_with_keys_fn=cls._flatten_with_keys)
            except ValueError:  # registered meanwhile (another thread, another library)
                pass
        _REGISTERED[key] = cls
        _ALL[0] = tuple(_REGISTERED.values())
    return _ALL[0]


def rebuildable() -> tuple[type, ...]:
    """The classes of :data:`KNOWN` registered as pytree nodes (ecospa may flatten an argument of
    one into the tensors of a call and rebuild it around a graph)."""
    return register_argument_types()
