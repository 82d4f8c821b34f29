"""The shared weights file of each format (dsv4_compile/shared_weights.py), on small programs: each engine
adds only the tensors the file does not hold yet (same name and bytes stored once, a same-named tensor
with other bytes kept apart), bf16-valued float32 ONNX initializers stored as bf16 and the models' outputs
unchanged (onnxruntime), the safetensors file valid and aligned, engines adding at once, and an
unreadable shared file refused in one line; a code-only package run over its program's own tensors. The real build's files and its disk peak are checked in
test_build.py (`built` fixture)."""
from __future__ import annotations

import json
import os
import struct
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dsv4_compile.export import ExportResult, export_aoti, export_onnx
from dsv4_compile.libstdcxx import load_aoti_package
from dsv4_compile.manifest import ArtifactError
from dsv4_compile.shared_weights import (SHARED_WEIGHTS, AotiWeights, ProgramConstants, WeightStore,
                                         finish_shared_weights, torch_tensors)
from helpers import assert_close


class _Engine(torch.nn.Module):
    """x [B, 64] -> x @ lin + table: `lin` the same in every engine (bf16 values, as a bf16 model's
    float32 twin holds), `table` (a buffer, not bf16-valued) per engine."""

    def __init__(self, table_value: float):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_((torch.arange(64 * 64, dtype=torch.float32).view(64, 64) / 4096 - 0.3).bfloat16())
        self.register_buffer("table", torch.full((64, 64), table_value) + torch.linspace(0, 1e-3, 64 * 64).view(64, 64))

    def forward(self, x):
        return self.lin(x) + self.table[: x.shape[0]]


class _Wrapper(torch.nn.Module):
    """An engine whose module holds the model as `model` (engines.py's wrappers): names `model.lin.weight`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _export_onnx(module, path, x, **store):
    program = torch.export.export(module, (x,))
    return export_onnx(ExportResult(program, (2, 2), (2, 2), False, {}), str(path), x, ["x"], ["y"], **store)


def _run_onnx(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def test_onnx_engines_write_only_new_tensors_and_compute_as_before(tmp_path):
    """Each export adds to onnx/weights.data only what it does not hold (measured after each one):
    lin (bf16: 8 KiB) and table 1.0 (float32: 16 KiB) with the first engine, nothing with the second
    (same tensors, `model.` names), table 2.0 with the third. No per-model data file is ever written.
    The outputs equal, bit for bit, those of the same models exported with float32 initializers inside."""
    import onnx

    os.makedirs(tmp_path / "onnx")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    modules = {"onnx/a.onnx": _Engine(1.0), "onnx/b.onnx": _Wrapper(_Engine(1.0)),
               "onnx/c.onnx": _Wrapper(_Engine(2.0))}
    prefixes = {"onnx/a.onnx": "", "onnx/b.onnx": "model.", "onnx/c.onnx": "model."}
    lin, table = 64 * 64 * 2, 64 * 64 * 4
    expected_end = {"onnx/a.onnx": lin + table, "onnx/b.onnx": lin + table, "onnx/c.onnx": lin + 2 * table}
    data = tmp_path / SHARED_WEIGHTS["onnx"]
    for rel, module in modules.items():
        files = _export_onnx(module, tmp_path / rel, x, weights=WeightStore(str(tmp_path), "onnx"), engine=rel,
                             prefix=prefixes[rel])
        assert files == [str(tmp_path / rel), str(data)]
        assert expected_end[rel] <= os.path.getsize(data) < expected_end[rel] + 128, rel  # + alignment
        assert not [f for f in os.listdir(tmp_path / "onnx") if f.endswith(".onnx.data")]

    assert finish_shared_weights(str(tmp_path)) == {"onnx": SHARED_WEIGHTS["onnx"]}
    assert sorted(os.listdir(tmp_path / "onnx")) == ["a.onnx", "b.onnx", "c.onnx", "weights.data"]
    for rel, module in modules.items():
        model = onnx.load(str(tmp_path / rel), load_external_data=False)
        dtypes = {t.name.removeprefix(prefixes[rel]): t.data_type for t in model.graph.initializer if t.external_data}
        assert dtypes == {"lin.weight": onnx.TensorProto.BFLOAT16, "table": onnx.TensorProto.FLOAT}, rel
        assert {e.key: e.value for e in model.graph.initializer[0].external_data}["location"] == "weights.data"
        assert not [n.name for n in model.graph.node if n.metadata_props]  # the exporter's stack traces dropped
        inline = tmp_path / "inline" / rel
        os.makedirs(inline.parent, exist_ok=True)
        assert _export_onnx(module, inline, x) == [str(inline)]  # float32 initializers in the model
        assert {t.data_type for t in onnx.load(str(inline)).graph.initializer if t.name.endswith("lin.weight")} == {
            onnx.TensorProto.FLOAT}
        np.testing.assert_array_equal(_run_onnx(tmp_path / rel, x), _run_onnx(inline, x), err_msg=rel)


def test_a_float32_initializer_with_other_values_stays_float32(tmp_path):
    module = _Engine(1.0)
    with torch.no_grad():
        module.lin.weight.add_(1e-4)  # no longer bf16 values
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    _export_onnx(module, tmp_path / "m.onnx", x, weights=WeightStore(str(tmp_path), "onnx"), engine="m.onnx")
    finish_shared_weights(str(tmp_path))
    assert os.path.getsize(tmp_path / SHARED_WEIGHTS["onnx"]) >= 2 * 64 * 64 * 4
    np.testing.assert_allclose(_run_onnx(tmp_path / "m.onnx", x), module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def _header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class _Package:  # what AotiWeights asks of an AOTInductor package
    def __init__(self, fqns):
        self.fqns, self.constants = fqns, None

    def get_constant_fqns(self):
        return self.fqns

    def load_constants(self, constants, *, check_full_update, user_managed):
        assert check_full_update and user_managed
        self.constants = constants


def test_aoti_engines_add_by_name_and_bytes(tmp_path):
    w, rope_512, rope_1k = torch.randn(8, 8), torch.randn(4), torch.randn(4)
    engines = {"aoti/prefill-512.pt2": ({"w": w, "rope": rope_512}, ""),
               "aoti/decode-512.pt2": ({"model.w": w.clone(), "model.rope": rope_512.clone()}, "model."),
               "aoti/decode-1024.pt2": ({"model.w": w.clone(), "model.rope": rope_1k}, "model.")}
    store = WeightStore(str(tmp_path), "aoti", engines=3)
    sizes = []
    for rel, (tensors, prefix) in engines.items():
        store.add(rel, torch_tensors(tensors), prefix)
        sizes.append(os.path.getsize(store.data_path))
    assert sizes[1] == sizes[0] and sizes[2] == sizes[0] + 4 * 4  # the second wrote nothing, the third rope_1k
    assert finish_shared_weights(str(tmp_path)) == {"aoti": SHARED_WEIGHTS["aoti"]}
    assert os.listdir(tmp_path / "aoti") == ["weights.safetensors"]
    path = str(tmp_path / SHARED_WEIGHTS["aoti"])
    assert os.path.getsize(path) == sizes[2]  # the header went into its reserved room
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["rope", "rope#1", "w"]
        assert torch.equal(f.get_tensor("rope#1"), rope_1k) and torch.equal(f.get_tensor("w"), w)

    weights = AotiWeights(str(tmp_path), torch.device("cpu"))
    prefill, decode = _Package(["w", "rope"]), _Package(["model.w", "model.rope"])
    weights.load_into(prefill, str(tmp_path / "aoti/prefill-512.pt2"))
    weights.load_into(decode, str(tmp_path / "aoti/decode-1024.pt2"))
    assert prefill.constants["w"] is decode.constants["model.w"]  # one tensor, no copy
    assert torch.equal(decode.constants["model.rope"], rope_1k)
    with pytest.raises(ArtifactError, match="constant 'bias' of aoti/prefill-512.pt2"):
        weights.load_into(_Package(["w", "bias"]), str(tmp_path / "aoti/prefill-512.pt2"))


def test_aoti_tensors_stay_aligned_and_a_header_past_its_room_still_finishes(tmp_path):
    """A 3-byte uint8 tensor before float32 ones: a padding tensor keeps every offset a multiple of its
    element size. The first engine reserved the header's room for itself alone (engines=1); a second
    with 200 more tensors outgrows it: the file is rewritten, still valid."""
    odd, f32 = torch.tensor([1, 2, 3], dtype=torch.uint8), torch.arange(6, dtype=torch.float32)
    store = WeightStore(str(tmp_path), "aoti", engines=1)
    store.add("aoti/a.pt2", torch_tensors({"odd": odd}))
    with open(store.index_path) as f:
        reserved = json.load(f)["data_start"]
    extra = {f"extra.{i}": torch.full((2,), float(i)) for i in range(200)}
    store.add("aoti/b.pt2", torch_tensors({"f32": f32, **extra}))
    finish_shared_weights(str(tmp_path))
    path = tmp_path / SHARED_WEIGHTS["aoti"]
    header = _header(path)
    assert header["f32"]["data_offsets"][0] % 4 == 0
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    assert data_start % 8 == 0 and data_start > reserved  # the header outgrew its room
    assert [k for k in header if k.startswith("__padding__")], header.keys()
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("odd"), odd) and torch.equal(f.get_tensor("f32"), f32)
        assert torch.equal(f.get_tensor("extra.199"), torch.full((2,), 199.0))
    assert os.listdir(tmp_path / "aoti") == ["weights.safetensors"]


def test_engines_adding_at_once_store_each_tensor_once(tmp_path):
    """Export tasks run in parallel processes: one adds at a time (a lock per file; here threads, whose
    separate opens of the lock file exclude each other alike)."""
    w = torch.randn(256, 256)
    store = WeightStore(str(tmp_path), "aoti", engines=4)
    threads = [threading.Thread(target=store.add, args=(f"aoti/e{i}.pt2", torch_tensors(
        {"model.w": w, "model.i": torch.tensor([i])}), "model.")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finish_shared_weights(str(tmp_path))
    with safe_open(str(tmp_path / SHARED_WEIGHTS["aoti"]), "pt") as f:
        engines = json.loads(f.metadata()["engines"])
        assert sorted(f.keys()) == ["i", "i#1", "i#2", "i#3", "w"]
    assert sorted(engines) == [f"aoti/e{i}.pt2" for i in range(4)]
    assert {m["model.w"] for m in engines.values()} == {"w"}


def test_an_unreadable_shared_aoti_file_is_one_line_naming_it(tmp_path):
    store = WeightStore(str(tmp_path), "aoti")
    store.add("aoti/decode-512.pt2", torch_tensors({"model.w": torch.randn(8, 8)}), "model.")
    finish_shared_weights(str(tmp_path))
    path = tmp_path / SHARED_WEIGHTS["aoti"]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ArtifactError, match=r"aoti/weights\.safetensors: unreadable shared AOTInductor weights") as err:
        AotiWeights(str(tmp_path), torch.device("cpu")).tensors
    assert "\n" not in str(err.value)


def test_a_code_only_package_runs_over_its_programs_own_tensors(tmp_path):
    """ProgramConstants (bench_decode_step's AOTInductor engine): no weights on disk, the package computes
    as the module, and a program that lacks one of the package's constants is refused in one line."""
    module, x = _Wrapper(_Engine(0.5)), torch.randn(2, 64)
    program = torch.export.export(module, (x,))
    path = export_aoti(ExportResult(program, (2, 2), (2, 2), False, {}), str(tmp_path / "engine.pt2"),
                       with_constants=False)
    package = load_aoti_package(path, cuda=False, weights=ProgramConstants(program))
    # the compiled code may fuse the add into the GEMM (another summation order): fp32's tolerance
    assert_close("code-only package vs module", module(x).detach(), package(x))
    other = torch.export.export(_Wrapper(torch.nn.Linear(64, 64)), (x,))
    with pytest.raises(ArtifactError, match="model.table.*not a tensor of the exported program"):
        load_aoti_package(path, cuda=False, weights=ProgramConstants(other))
