"""Op rules and op facts (see ``ecospa.graph.rules.registry``). Importing this package registers
every rule."""
from ecospa.graph.rules import contraction, flex, pointwise, reduction, shape  # noqa: F401  (register)
from ecospa.graph.rules.registry import (FACTS, RULES, OpInfo, entry_key, has, info, is_pointwise, lookup, op_name,
                                        register)

__all__ = ["FACTS", "RULES", "OpInfo", "register", "lookup", "info", "has", "op_name", "is_pointwise", "entry_key"]
