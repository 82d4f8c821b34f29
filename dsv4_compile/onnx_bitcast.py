"""ONNX translation of `aten.view.dtype` (a bitcast) for the KV cache's byte layout and the MXFP4
experts' packed codes (int8 read as uint8) and e8m0 scales (float32 bit patterns built as int32,
model/weight_formats.py), in opset-21 arithmetic.

ONNX has no bitcast before opset 26 (`BitCast`), and the engines keep the project's opset. The cache
stores FP8 e4m3 codes, BF16 rope dims and (indexer "fp8") float32 scales as bytes
(model/kv_layout.py), so its pack/unpack reinterpret between those types and uint8. Here a float is
split into sign, exponent field and mantissa with exact float32 arithmetic (power-of-two scalings,
the exponent from floor(log2) corrected by comparing with the power itself), and bytes are
recombined the same way. Exact for every finite value of the source type, -0 included; NaN and
infinity are decoded from BF16 and float32 bits (an e8m0 scale byte 255 is NaN), not encoded (the
model never stores them).
"""
from __future__ import annotations

# name: (exponent bits, mantissa bits, bytes)
_FORMATS = {"FLOAT8E4M3FN": (4, 3, 1), "BFLOAT16": (8, 7, 2), "FLOAT": (8, 23, 4)}


def _const(value, dtype: str = "float"):
    import numpy as np
    from onnxscript import opset21 as op

    return op.Constant(value=_tensor(np.array(value, dtype={"float": np.float32, "int64": np.int64}[dtype])))


def _tensor(array):
    import onnx.numpy_helper

    return onnx.numpy_helper.from_array(array)


def _pow2(exponent):
    """2 ** exponent (float32 holding an integer) -> float32, exact."""
    from onnxscript import opset21 as op

    return op.Pow(_const(2.0), exponent)


def _encode(value, name: str):
    """float32 values exactly representable in format `name` -> its bit patterns, int64."""
    from onnxscript import opset21 as op

    ebits, mbits, _ = _FORMATS[name]
    bias = 2 ** (ebits - 1) - 1
    a = op.Abs(value)
    negative = op.Cast(op.Less(op.Div(_const(1.0), value), _const(0.0)), to=7)  # int64 0/1; 1/-0 = -inf
    safe = op.Max(a, _const(2.0 ** -149))
    e = op.Floor(op.Mul(op.Log(safe), _const(1.4426950408889634)))
    p = _pow2(e)
    e = op.Sub(e, op.Cast(op.Greater(p, safe), to=1))                         # log rounded up
    e = op.Add(e, op.Cast(op.LessOrEqual(op.Mul(_pow2(e), _const(2.0)), safe), to=1))  # rounded down
    normal = op.GreaterOrEqual(a, _const(2.0 ** (1 - bias)))
    e = op.Max(e, _const(float(1 - bias)))
    mant_normal = op.Mul(op.Sub(op.Div(a, _pow2(e)), _const(1.0)), _const(float(2 ** mbits)))
    mant_sub = op.Mul(op.Mul(a, _const(2.0 ** (bias - 1))), _const(float(2 ** mbits)))
    mant = op.Cast(op.Round(op.Where(normal, mant_normal, mant_sub)), to=7)
    field = op.Where(normal, op.Cast(op.Add(e, _const(float(bias))), to=7), _const(0, "int64"))
    return op.Add(op.Add(op.Mul(negative, _const(1 << (ebits + mbits), "int64")),
                         op.Mul(field, _const(1 << mbits, "int64"))), mant)


def _decode(bits, name: str):
    """int64 bit patterns of format `name` -> float32 values."""
    from onnxscript import opset21 as op

    ebits, mbits, _ = _FORMATS[name]
    bias = 2 ** (ebits - 1) - 1
    sign_unit = _const(1 << (ebits + mbits), "int64")
    negative = op.GreaterOrEqual(bits, sign_unit)
    magnitude = op.Mod(bits, sign_unit)
    field = op.Cast(op.Div(magnitude, _const(1 << mbits, "int64")), to=1)
    mant = op.Cast(op.Mod(magnitude, _const(1 << mbits, "int64")), to=1)
    frac = op.Div(mant, _const(float(2 ** mbits)))
    normal = op.Mul(op.Add(frac, _const(1.0)), _pow2(op.Sub(field, _const(float(bias)))))
    subnormal = op.Mul(frac, _const(2.0 ** (1 - bias)))
    value = op.Where(op.Equal(field, _const(0.0)), subnormal, normal)
    if name != "FLOAT8E4M3FN":  # IEEE formats: the all-ones exponent field holds infinity and NaN
        special = op.Where(op.Equal(mant, _const(0.0)), _const(float("inf")), _const(float("nan")))
        value = op.Where(op.Equal(field, _const(float(2 ** ebits - 1))), special, value)
    sign = op.Sub(_const(1.0), op.Mul(_const(2.0), op.Cast(negative, to=1)))         # +-1: 0 * -1 = -0
    return op.Mul(value, sign)


def onnx_view_dtype(self, dtype):
    """aten.view.dtype for FP8 e4m3 / BF16 / float32 <-> uint8 (the bytes of the values, little endian),
    int8 <-> uint8 (two's complement: the same byte), int32 -> float32 and any dtype as itself."""
    from onnxscript import opset21 as op

    source, target = self.dtype.name, dtype.name
    if source == target:  # a view as its own dtype (e8m0 scales held as uint8, read as bytes)
        return op.Identity(self)
    if target == "UINT8" and source in _FORMATS:
        nbytes = _FORMATS[source][2]
        bits = _encode(op.Cast(self, to=1), source)                           # [..., n] int64
        if nbytes == 1:
            return op.Cast(bits, to=2)
        parts = [op.Unsqueeze(op.Mod(op.Div(bits, _const(256 ** k, "int64")), _const(256, "int64")), _const([-1], "int64"))
                 for k in range(nbytes)]
        shape = op.Concat(op.Shape(self, end=-1), _const([-1], "int64"), axis=0)
        return op.Cast(op.Reshape(op.Concat(*parts, axis=-1), shape), to=2)
    if source == "UINT8" and target in _FORMATS:
        nbytes = _FORMATS[target][2]
        data = op.Cast(self, to=7)
        if nbytes > 1:
            shape = op.Concat(op.Shape(self, end=-1), _const([-1, nbytes], "int64"), axis=0)
            weights = _const([256 ** k for k in range(nbytes)], "int64")
            data = op.ReduceSum(op.Mul(op.Reshape(data, shape), weights), _const([-1], "int64"), keepdims=0)
        return op.Cast(_decode(data, target), to=dtype)
    if source == "INT32" and target == "FLOAT":  # bit patterns built as integers (e8m0 scales' values)
        return op.Cast(_decode(op.Mod(op.Cast(self, to=7), _const(2 ** 32, "int64")), "FLOAT"), to=dtype)
    if {source, target} == {"INT8", "UINT8"}:  # MXFP4 experts' packed codes: the same byte, read the other way
        data = op.Cast(self, to=7)                                                # int64
        return op.Cast(op.Mod(data, _const(256, "int64")) if target == "UINT8" else
                       op.Sub(data, op.Mul(op.Cast(op.GreaterOrEqual(data, _const(128, "int64")), to=7),
                                           _const(256, "int64"))), to=dtype)
    raise NotImplementedError(f"view.dtype {source} -> {target}: only FP8 e4m3, BF16 and float32 <-> uint8, int8 <-> "
                              f"uint8 and int32 -> float32 are translated")
