"""The op table (``ecospa.ops.registry``): per op its channel rule, its narrow rule and its facts,
in one file per family of ops (pointwise, shape, contraction, reduction, flex, cache, inplace, observe). Importing this
package registers every rule."""
from ecospa.ops import cache, contraction, flex, inplace, observe, pointwise, reduction, shape  # noqa: F401  (register)
from ecospa.ops.registry import (FACTS, OPS, NarrowError, OpSpec, entry_key, has, is_pointwise, lookup, narrow_rule,
                                 no_narrow_rule, op_name, register, spec)

__all__ = ["FACTS", "OPS", "OpSpec", "NarrowError", "register", "narrow_rule", "no_narrow_rule", "spec", "lookup",
           "has", "op_name", "is_pointwise", "entry_key"]
