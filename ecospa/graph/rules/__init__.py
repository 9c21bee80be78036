"""Op rules: how channels flow through each op. Importing this package registers them all."""
from ecospa.graph.rules import contraction, pointwise, reduction, shape  # noqa: F401  (register)
from ecospa.graph.rules.pointwise import is_pointwise
from ecospa.graph.rules.pointwise import pointwise as _pointwise
from ecospa.graph.rules.registry import RULES, register
from ecospa.graph.rules.registry import lookup as _lookup

__all__ = ["RULES", "register", "lookup"]


def lookup(target):
    """The rule for ``target``: a registered one, else the pointwise rule for ops ATen tags
    pointwise, else None."""
    rule = _lookup(target)
    if rule is None and is_pointwise(target):
        return _pointwise
    return rule
