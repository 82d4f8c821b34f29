"""The ONNX translation of aten.view.dtype (dsv4_compile/onnx_bitcast.py): bit-exact against torch for
every value kind the KV cache stores (FP8 e4m3, BF16, float32 <-> uint8) and the MXFP4 experts' bytes
(int8 <-> uint8), run by onnxruntime."""
from __future__ import annotations

import numpy as np
import torch

from dsv4_compile.export import ONNX_OPSET
from dsv4_compile.onnx_bitcast import onnx_view_dtype


class _Bitcasts(torch.nn.Module):
    def forward(self, x):
        f8 = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)  # e4m3fn: no infinity
        bf = x.to(torch.bfloat16).view(torch.uint8)
        f32 = x.view(torch.uint8)
        return (f8, bf, f32, f8.view(torch.float8_e4m3fn).float(), bf.view(torch.bfloat16).float(),
                f32.view(torch.float32))


def test_bitcasts_are_bit_exact_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    # magnitudes across every binade of e4m3 and far beyond (BF16, float32), both signs, and the edges:
    # zeros of both signs, e4m3 max and subnormals, float32 subnormals
    x = torch.randn(3, 700, generator=g) * torch.exp2(torch.randint(-20, 12, (3, 700), generator=g).float())
    x[0, :7] = torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0 ** -9, -(2.0 ** -7), 2.0 ** -6])
    x[1, :4] = torch.tensor([1e-40, -3e-39, 1.0, 2.0 ** -126])
    program = torch.export.export(_Bitcasts(), (x,), dynamic_shapes=({0: torch.export.Dim("B", min=1, max=9)},))
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, opset_version=ONNX_OPSET,
                                     custom_translation_table={torch.ops.aten.view.dtype: onnx_view_dtype})
    onnx_program.save(str(tmp_path / "bitcasts.onnx"))
    session = ort.InferenceSession(str(tmp_path / "bitcasts.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for name, out, ref in zip(("fp8 bytes", "bf16 bytes", "f32 bytes", "fp8 values", "bf16 values", "f32 values"),
                              outputs, _Bitcasts()(x)):
        ref = ref.numpy()
        assert out.dtype == ref.dtype and out.shape == ref.shape, name
        assert np.array_equal(out.view(np.uint8), ref.view(np.uint8)), f"{name}: {int((out != ref).sum())} differ"



class _ByteViews(torch.nn.Module):
    def forward(self, packed):
        unsigned = packed.view(torch.uint8)  # MXFP4 experts' packed codes, read as bytes (weight_formats.py)
        return unsigned, unsigned.view(torch.int8)


def test_int8_uint8_views_are_the_same_bytes_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    packed = torch.arange(-128, 128, dtype=torch.int8).reshape(2, 128)  # every byte
    program = torch.export.export(_ByteViews(), (packed,))
    onnx_program = torch.onnx.export(program, (packed,), dynamo=True, opset_version=ONNX_OPSET,
                                     custom_translation_table={torch.ops.aten.view.dtype: onnx_view_dtype})
    onnx_program.save(str(tmp_path / "bytes.onnx"))
    session = ort.InferenceSession(str(tmp_path / "bytes.onnx"), providers=["CPUExecutionProvider"])
    for name, out, ref in zip(("uint8", "int8"), session.run(None, {session.get_inputs()[0].name: packed.numpy()}),
                              _ByteViews()(packed)):
        assert out.dtype == ref.numpy().dtype and np.array_equal(out, ref.numpy()), name


class _E8M0Scales(torch.nn.Module):
    """MXFP4Experts' scales as the model holds them: e8m0 bytes in a uint8 buffer, decoded by the plain ops."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128))

    def forward(self, x):
        from dsv4_compile.model.weight_formats import e8m0_to_float

        return x * e8m0_to_float(self.scale)


def test_e8m0_byte_scales_decode_exactly_in_onnxruntime(tmp_path):
    """Every e8m0 byte (2^-127 subnormal, 2^127, 255 = NaN) decodes in onnxruntime to torch's value."""
    import onnxruntime as ort

    x = torch.ones(2, 128)
    program = torch.export.export(_E8M0Scales(), (x,))
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, opset_version=ONNX_OPSET,
                                     custom_translation_table={torch.ops.aten.view.dtype: onnx_view_dtype})
    onnx_program.save(str(tmp_path / "e8m0.onnx"))
    session = ort.InferenceSession(str(tmp_path / "e8m0.onnx"), providers=["CPUExecutionProvider"])
    (out,), ref = session.run(None, {session.get_inputs()[0].name: x.numpy()}), _E8M0Scales()(x).numpy()
    got, want = out.view(np.uint32), ref.view(np.uint32)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of 256 differ"
