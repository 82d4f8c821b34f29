"""The merge of a build's per-engine weights into one file per format (dsv4_compile/shared_weights.py), on
small programs: tensors of the same name and bytes stored once, a same-named tensor with other bytes
kept apart, the models still run (onnxruntime), and an unreadable shared file refused in one line.
The real build's files are checked in test_build.py (`built` fixture)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4_compile.export import ExportResult, export_onnx
from dsv4_compile.manifest import ArtifactError
from dsv4_compile.shared_weights import SHARED_WEIGHTS, AotiWeights, aoti_sidecar, share_weights


class _Engine(torch.nn.Module):
    """x [B, 64] -> x @ lin + table: `lin` the same in every engine, `table` (a buffer) per engine."""

    def __init__(self, table_value: float):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(64 * 64, dtype=torch.float32).view(64, 64) / 4096)
        self.register_buffer("table", torch.full((64, 64), table_value))

    def forward(self, x):
        return self.lin(x) + self.table[: x.shape[0]]


class _Wrapper(torch.nn.Module):
    """An engine whose module holds the model as `model` (engines.py's wrappers): names `model.lin.weight`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_onnx_models_share_one_data_file_and_still_run(tmp_path):
    import onnxruntime as ort

    os.makedirs(tmp_path / "onnx")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    modules = {"onnx/a.onnx": _Engine(1.0), "onnx/b.onnx": _Wrapper(_Engine(1.0)), "onnx/c.onnx": _Wrapper(_Engine(2.0))}
    prefixes = {"onnx/a.onnx": "", "onnx/b.onnx": "model.", "onnx/c.onnx": "model."}
    for rel, module in modules.items():
        program = torch.export.export(module, (x,))
        export_onnx(ExportResult(program, (2, 2), (2, 2), False, {}), str(tmp_path / rel), x, ["x"], ["y"],
                    external_data=True)
    one_copy = 64 * 64 * 4
    assert sum(os.path.getsize(tmp_path / f"{rel}.data") for rel in modules) >= 6 * one_copy  # each its own

    assert share_weights(str(tmp_path), {"onnx": prefixes}) == {"onnx": SHARED_WEIGHTS["onnx"]}
    # lin once, table 1.0 once (a and b), table 2.0 once (c): three tensors, some alignment
    assert sorted(os.listdir(tmp_path / "onnx")) == ["a.onnx", "b.onnx", "c.onnx", "weights.data"]
    assert 3 * one_copy <= os.path.getsize(tmp_path / SHARED_WEIGHTS["onnx"]) < 3 * one_copy + 256
    for rel, module in modules.items():
        session = ort.InferenceSession(str(tmp_path / rel), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(y, module(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def _sidecar(root, rel: str, tensors: dict) -> None:
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    open(os.path.join(root, rel), "wb").close()  # the package itself plays no part in the merge
    save_file(tensors, aoti_sidecar(os.path.join(root, rel)))


def test_aoti_sidecars_merge_by_name_and_bytes(tmp_path):
    w, rope_512, rope_1k = torch.randn(8, 8), torch.randn(4), torch.randn(4)
    _sidecar(tmp_path, "aoti/prefill-512.pt2", {"w": w, "rope": rope_512})
    _sidecar(tmp_path, "aoti/decode-512.pt2", {"model.w": w.clone(), "model.rope": rope_512.clone()})
    _sidecar(tmp_path, "aoti/decode-1024.pt2", {"model.w": w.clone(), "model.rope": rope_1k})
    files = {"aoti/prefill-512.pt2": "", "aoti/decode-512.pt2": "model.", "aoti/decode-1024.pt2": "model."}
    assert share_weights(str(tmp_path), {"aoti": files}) == {"aoti": SHARED_WEIGHTS["aoti"]}
    assert sorted(os.listdir(tmp_path / "aoti")) == sorted([os.path.basename(f) for f in files] + ["weights.safetensors"])
    with safe_open(str(tmp_path / SHARED_WEIGHTS["aoti"]), "pt") as f:
        assert sorted(f.keys()) == ["rope", "rope#1", "w"]
        assert torch.equal(f.get_tensor("rope#1"), rope_1k) and torch.equal(f.get_tensor("w"), w)

    class Package:  # what AotiWeights asks of an AOTInductor package
        def __init__(self, fqns):
            self.fqns, self.constants = fqns, None

        def get_constant_fqns(self):
            return self.fqns

        def load_constants(self, constants, *, check_full_update, user_managed):
            assert check_full_update and user_managed
            self.constants = constants

    weights = AotiWeights(str(tmp_path), torch.device("cpu"))
    prefill, decode = Package(["w", "rope"]), Package(["model.w", "model.rope"])
    weights.load_into(prefill, str(tmp_path / "aoti/prefill-512.pt2"))
    weights.load_into(decode, str(tmp_path / "aoti/decode-1024.pt2"))
    assert prefill.constants["w"] is decode.constants["model.w"]  # one tensor, no copy
    assert torch.equal(decode.constants["model.rope"], rope_1k)
    with pytest.raises(ArtifactError, match="constant 'bias' of aoti/prefill-512.pt2"):
        weights.load_into(Package(["w", "bias"]), str(tmp_path / "aoti/prefill-512.pt2"))


def test_an_unreadable_shared_aoti_file_is_one_line_naming_it(tmp_path):
    _sidecar(tmp_path, "aoti/decode-512.pt2", {"model.w": torch.randn(8, 8)})
    share_weights(str(tmp_path), {"aoti": {"aoti/decode-512.pt2": "model."}})
    path = tmp_path / SHARED_WEIGHTS["aoti"]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ArtifactError, match=r"aoti/weights\.safetensors: unreadable shared AOTInductor weights") as err:
        AotiWeights(str(tmp_path), torch.device("cpu")).tensors
    assert "\n" not in str(err.value)
