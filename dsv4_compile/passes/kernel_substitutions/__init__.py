"""Kernel substitutions: one module per `torch.ops.dsv4` op family, named like the op (`<op>.py`),
registering "<op>.triton" (the Triton kernel of `kernels/<op>/`) with its predicate and config lookup;
`_common.py` holds what they share. `selection.discover()` imports every module here on first use.
"""
