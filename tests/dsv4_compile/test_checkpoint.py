"""Checkpoints in the release's layouts and shipped dtypes: write (synthetic), read, check.

The writer turns a seeded model into the shipped formats (FP8 + e8m0 tile scales, MXFP4 experts,
bf16 / fp32 / int64 elsewhere); loading must give back exactly the dequantized shipped values, the
same model from either layout, and refuse a bad checkpoint with every problem named before building.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4_compile as d
from dsv4_compile.checkpoint import CheckpointError, write_checkpoint
from dsv4_compile.checkpoint import names
from dsv4_compile.checkpoint.shipped import quantize_as_shipped
from dsv4_compile.checkpoint.write import shipped_tensors
from dsv4_compile.model.layers import FP8Linear
from dsv4_compile.model.moe import FP8Experts, MXFP4Experts, RoutedExperts
from dsv4_compile.model.weight_formats import dequantize_fp8_weight, dequantize_mxfp4, e8m0_to_float, quantize_fp8_weight

# Small, but with K multiples of 128 (FP8 GEMM linears) and splits that keep whole 128-wide FP8 tiles
# per rank for mp=2: wq_b 4x128 rows, wo_a 2x128 rows, wo_b 256 columns, indexer wq_b 4x64 rows.
CONFIG = d.ModelConfig.from_preset("tiny").replace(dim=128, q_lora_rank=128, head_dim=128, rope_head_dim=64,
                                                   o_lora_rank=128, index_head_dim=64, max_seq_len=128)
# Base models' FP8 routed experts need dim and inter multiples of 128 to stay FP8 (W8A8's activation
# block); inter 256 keeps the shared expert's FP8 splits on whole tiles for mp=2.
FP8_EXPERTS = CONFIG.replace(moe_inter_dim=256)


@pytest.fixture(scope="module")
def model():
    return d.Transformer(CONFIG, seed=3)


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"hf": write_checkpoint(model, root / "hf", shards=3),
            "inference": write_checkpoint(model, root / "inference", layout="inference", mp=2)}


def dequantized_release(shipped: dict[str, torch.Tensor], rel: str) -> torch.Tensor:
    t = shipped[rel]
    scale = shipped.get(rel[: -len(".weight")] + ".scale") if rel.endswith(".weight") else None
    if t.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_weight(t, scale)
    if t.dtype == torch.int8:
        return dequantize_mxfp4(t, scale)
    return t


def test_round_trip_is_exact(model, written):
    """model -> shipped formats -> files -> loader: every weight equals its dequantized shipped value,
    bit for bit, and writing the loaded model again reproduces the same values (a fixed point)."""
    shipped = shipped_tensors(model)
    loaded = d.from_pretrained(written["hf"], dtype="float32", weights="bf16")
    for ours, value in loaded.state_dict().items():
        if names.is_stacked_experts(ours):
            want = torch.stack([dequantized_release(shipped, r) for r in names.expert_release_names(ours, CONFIG.n_routed_experts)])
        else:
            want = dequantized_release(shipped, names.release_name(ours))
        assert torch.equal(value, want.to(value.dtype)), ours
    again = shipped_tensors(loaded)
    assert set(again) == set(shipped)
    for rel in shipped:
        if not rel.endswith(".scale"):
            assert torch.equal(dequantized_release(again, rel), dequantized_release(shipped, rel)), rel


def test_both_layouts_give_the_same_model(written):
    hf = d.from_pretrained(written["hf"], dtype="float32", weights="bf16")
    inf = d.from_pretrained(written["inference"], dtype="float32", weights="bf16")
    assert (hf.checkpoint.layout, inf.checkpoint.layout) == ("huggingface", "inference")
    a, b = hf.state_dict(), inf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(tokens), inf(tokens))


def test_as_shipped_keeps_fp8_linears(written):
    shipped = {k: v for f in Path(written["hf"]).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    fp8 = d.from_pretrained(written["hf"], dtype="float32", weights="as-shipped")
    plain = d.from_pretrained(written["hf"], dtype="float32", weights="bf16")
    kept = {n for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    # wq_a, wq_b, wkv, wo_b (K = 128 or 512) in 4 layers + MTP block, indexer wq_b (2 CSA layers), shared
    # w1/w3 (K = dim) in 5 blocks, e_proj/h_proj; wo_a stays BF16 (DeepSeek multiplies it in BF16)
    assert "layers.1.attn.wq_a" in kept and "mtp.0.e_proj" in kept and "layers.1.attn.indexer.wq_b" in kept
    assert not any(k.endswith("wo_a") or k.endswith("shared.w2") for k in kept)
    assert fp8.checkpoint.fp8_linears == len(kept) == 4 * 4 + 1 + 4 * 2 + 2
    for name in kept:
        got = fp8.get_submodule(name).weight
        assert torch.equal(got.view(torch.uint8), shipped[names.release_name(name + ".weight")].view(torch.uint8)), name
    # the routed experts stay MXFP4 (codes as in the file), computing what the dequantized ones do
    assert fp8.checkpoint.mxfp4_experts == CONFIG.n_layers + CONFIG.n_mtp_layers
    experts = fp8.layers[2].ffn.experts
    assert isinstance(experts, MXFP4Experts) and experts.w1.dtype == torch.int8
    assert not experts.quantize_input  # inter 32: no whole 128-blocks for W4A8, so W4A16
    assert torch.equal(experts.w2[5], shipped["layers.2.ffn.experts.5.w2.weight"])
    g = torch.Generator().manual_seed(2)
    x, ids = torch.randn(7, CONFIG.dim, generator=g), torch.randint(0, CONFIG.n_routed_experts, (7, 2), generator=g)
    w = torch.rand(7, 2, generator=g)
    with torch.no_grad():
        assert torch.equal(experts(x, ids.int(), w), plain.layers[2].ffn.experts(x, ids.int(), w))
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y8, y = fp8(tokens), plain(tokens)
    # the same weights; only the FP8 rounding of the linears' inputs differs (3 mantissa bits)
    rel = ((y8 - y).norm() / y.norm()).item()
    assert 0 < rel < 0.1


def test_as_shipped_without_simulation_is_the_dequantized_model(written):
    """simulate_quantization=False: the FP8 linears skip the input's FP8 rounding, so the as-shipped model
    computes exactly what the dequantized one does (same weight values, same float32 products)."""
    config = d.ModelConfig.from_pretrained(written["hf"], simulate_quantization=False, dtype="float32")
    fp8 = d.from_pretrained(written["hf"], config=config, weights="as-shipped")
    plain = d.from_pretrained(written["hf"], config=config, weights="bf16")
    assert fp8.checkpoint.fp8_linears > 0 and fp8.checkpoint.mxfp4_experts > 0
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fp8(tokens), plain(tokens))


@pytest.fixture(scope="module")
def fp8_written(tmp_path_factory):
    model, root = d.Transformer(FP8_EXPERTS, seed=4), tmp_path_factory.mktemp("fp8_experts")
    return {"hf": write_checkpoint(model, root / "hf", expert_format="fp8"),
            "inference": write_checkpoint(model, root / "inference", layout="inference", mp=2, expert_format="fp8")}


def _as_fp8_experts(model, plain, quantize_input: bool):
    """`model` with each FP8Experts replaced by one made from `plain`'s (the dequantized load's) experts of
    the same name, quantized again (the same values: power-of-two scales), running with quantize_input."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FP8Experts):
            experts = plain.get_submodule(name)
            assert type(experts) is RoutedExperts
            e, inter, dim = experts.w1.shape
            fresh = FP8Experts(e, dim, inter, experts.limit, quantize_input=quantize_input)
            for w in ("w1", "w2", "w3"):
                codes, scale = quantize_fp8_weight(getattr(experts, w).detach())
                getattr(fresh, w).copy_(codes)
                getattr(fresh, w + "_scale").copy_(e8m0_to_float(scale))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fresh)
    return model


def test_as_shipped_keeps_fp8_experts(fp8_written):
    """A base model's FP8 routed experts (e4m3 + e8m0 128x128 scales), either layout, as shipped: every MoE
    layer's experts are FP8Experts holding the file's codes and scales, quantizing their activations
    (W8A8, `moe_experts_fp8_w8a8`: simulate_quantization is on); the logits equal, bit for bit, those of
    the same model whose experts are the dequantized load's quantized again (the plain reference) and
    differ from it with W8A16 experts (the W8A8 op really runs); both layouts load the same model."""
    shipped = {k: v for f in Path(fp8_written["hf"]).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    fp8 = d.from_pretrained(fp8_written["hf"], dtype="float32", weights="as-shipped")
    n_moe = FP8_EXPERTS.n_layers + FP8_EXPERTS.n_mtp_layers
    assert (fp8.checkpoint.fp8_experts, fp8.checkpoint.mxfp4_experts) == (n_moe, 0)
    experts = fp8.layers[2].ffn.experts
    assert isinstance(experts, FP8Experts) and experts.quantize_input and experts.w2.dtype == torch.float8_e4m3fn
    assert torch.equal(experts.w2[5].view(torch.uint8), shipped["layers.2.ffn.experts.5.w2.weight"].view(torch.uint8))
    assert torch.equal(experts.w3_scale[1], e8m0_to_float(shipped["layers.2.ffn.experts.1.w3.scale"]))
    plain = d.from_pretrained(fp8_written["hf"], dtype="float32", weights="bf16")
    reference = _as_fp8_experts(d.from_pretrained(fp8_written["hf"], dtype="float32", weights="as-shipped"), plain, True)
    w8a16 = _as_fp8_experts(d.from_pretrained(fp8_written["hf"], dtype="float32", weights="as-shipped"), plain, False)
    inference = d.from_pretrained(fp8_written["inference"], dtype="float32", weights="as-shipped")
    a, b = fp8.state_dict(), inference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                                                    b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k])
                                        for k in a)
    tokens = torch.randint(0, FP8_EXPERTS.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = fp8(tokens)
        assert torch.equal(y, reference(tokens)) and torch.equal(y, inference(tokens))
        assert not torch.equal(y, w8a16(tokens))


def test_fp8_experts_without_simulation_are_the_dequantized_experts(fp8_written):
    """simulate_quantization=False: FP8Experts run moe_experts_fp8 (no FP8 rounding of the activations),
    so the as-shipped model computes exactly what the dequantized one does; weights="bf16" still
    dequantizes the experts into RoutedExperts."""
    config = d.ModelConfig.from_pretrained(fp8_written["hf"], simulate_quantization=False, dtype="float32")
    fp8 = d.from_pretrained(fp8_written["hf"], config=config, weights="as-shipped")
    plain = d.from_pretrained(fp8_written["hf"], config=config, weights="bf16")
    assert fp8.checkpoint.fp8_experts > 0 and not fp8.layers[1].ffn.experts.quantize_input
    assert type(plain.layers[1].ffn.experts) is RoutedExperts and plain.checkpoint.fp8_experts == 0
    tokens = torch.randint(0, FP8_EXPERTS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fp8(tokens), plain(tokens))


def test_as_shipped_mxfp4_experts_run_w4a8(tmp_path):
    """The instruct releases' MXFP4 experts with dim and inter multiples of 128, as shipped: MXFP4Experts
    quantizing their activations (W4A8, `moe_experts_mxfp4_w4a8`, as DeepSeek's inference runs them),
    as quantize_as_shipped makes them too; with simulate_quantization=False W4A16 (`moe_experts_mxfp4`),
    whose logits are the dequantized model's; the W4A8 logits differ from those (the op really runs)."""
    path = write_checkpoint(d.Transformer(FP8_EXPERTS, seed=5), tmp_path / "hf")
    w4a8 = d.from_pretrained(path, dtype="float32", weights="as-shipped")
    experts = w4a8.layers[2].ffn.experts
    assert isinstance(experts, MXFP4Experts) and experts.quantize_input and w4a8.checkpoint.mxfp4_experts > 0
    shipped = {k: v for f in Path(path).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert experts.w3_scale.dtype == torch.uint8                                   # the e8m0 bytes as shipped
    assert torch.equal(experts.w3_scale[1], shipped["layers.2.ffn.experts.1.w3.scale"].view(torch.uint8))
    assert quantize_as_shipped(d.Transformer(FP8_EXPERTS, seed=5)).layers[2].ffn.experts.quantize_input
    g = torch.Generator().manual_seed(2)
    x, ids = torch.randn(7, FP8_EXPERTS.dim, generator=g), torch.randint(0, FP8_EXPERTS.n_routed_experts, (7, 2), generator=g)
    w = torch.rand(7, 2, generator=g)
    buffers = [getattr(experts, n) for n in ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale")]
    with torch.no_grad():
        assert torch.equal(experts(x, ids.int(), w),
                           torch.ops.dsv4.moe_experts_mxfp4_w4a8(x, ids.int(), w, *buffers, experts.limit))
    config = d.ModelConfig.from_pretrained(path, simulate_quantization=False, dtype="float32")
    w4a16 = d.from_pretrained(path, config=config, weights="as-shipped")
    plain = d.from_pretrained(path, config=config, weights="bf16")
    assert not w4a16.layers[2].ffn.experts.quantize_input
    tokens = torch.randint(0, FP8_EXPERTS.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y16 = w4a16(tokens)
        assert torch.equal(y16, plain(tokens))
        assert not torch.equal(w4a8(tokens), y16)


def test_release_name_variants_load_the_same(model, written, tmp_path):
    """transformers' save_pretrained spellings: model. prefix, embed_tokens, hc_head.hc_fn, attn.norm."""
    src = Path(written["hf"])
    index = json.loads((src / "model.safetensors.index.json").read_text())
    renamed = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(src / file))
        out = {}
        for k, v in tensors.items():
            k2 = k.replace("embed.weight", "embed_tokens.weight").replace("hc_head_fn", "hc_head.hc_fn")
            k2 = k2.replace("attn.kv_norm.weight", "attn.norm.weight")
            out["model." + k2 if not k2.startswith("head.") else k2] = v
        save_file(out, str(tmp_path / file))
        renamed.update({k: file for k in out})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": renamed}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    a = d.from_pretrained(tmp_path, dtype="float32", weights="bf16").state_dict()
    b = d.from_pretrained(src, dtype="float32", weights="bf16").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_mtp_tensors_mtp_is_off_and_said(written, tmp_path):
    src = Path(written["hf"])
    for file in src.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(str(file)).items() if not k.startswith("mtp.")}, str(tmp_path / file.name))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.warns(UserWarning, match="no MTP tensors .* loaded with MTP off"):
        m = d.from_pretrained(tmp_path, dtype="float32")
    assert m.config.n_mtp_layers == 0 and len(m.mtp) == 0 and m.checkpoint.notes


def test_inference_layout_needs_a_config(written, tmp_path):
    src = Path(written["inference"])
    for file in src.glob("model*-mp2.safetensors"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(CheckpointError, match="no config.json .* pass config="):
        d.from_pretrained(tmp_path)
    m = d.from_pretrained(tmp_path, config=src / "config.json", dtype="float32", weights="bf16")
    assert m.config.n_layers == CONFIG.n_layers


# ---- bad checkpoints: each refused with what is wrong, nothing built ------------------------------

def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_shard(path: Path, edit) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    for file in files:
        tensors = load_file(str(path / file))
        new = edit(dict(tensors))
        if set(new) != set(tensors) or any(new[k] is not tensors[k] for k in new):
            save_file(new, str(path / file))
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in new or v != file}
            index["weight_map"].update({k: file for k in new})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _set(name, value):
    return lambda t: {**t, name: value} if name in t else t


BAD = {
    "missing shard": (lambda p: (p / "model-00002-of-00003.safetensors").unlink(),
                      r"missing shard model-00002-of-00003.safetensors"),
    "truncated file": (lambda p: (p / "model-00003-of-00003.safetensors").write_bytes(
        (p / "model-00003-of-00003.safetensors").read_bytes()[:-1000]), r"model-00003-of-00003.safetensors: truncated"),
    "wrong dtype": (lambda p: _edit_shard(p, _set("norm.weight", torch.ones(128, dtype=torch.int32))),
                    r"tensor norm.weight: dtype I32; expected F32 or BF16 or F16"),
    "missing scale": (lambda p: _edit_shard(p, _drop("layers.1.attn.wq_a.scale")),
                      r"missing tensor layers.1.attn.wq_a.scale \(the scales of the F8_E4M3 weight"),
    "extra tensor": (lambda p: _edit_shard(p, lambda t: {**t, "layers.1.attn.wq_c.weight": torch.ones(2)}
                                           if "norm.weight" in t else t),
                     r"unexpected tensor layers.1.attn.wq_c.weight F32 \[2\]"),
    "changed head count": (lambda p: (p / "config.json").write_text(json.dumps(
        dict(json.loads((p / "config.json").read_text()), num_attention_heads=2))),
        r"tensor layers.0.attn.wq_b.weight: shape \[512, 128\]; the config needs \[256, 128\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_refused(case, written, tmp_path):
    path = _copy(Path(written["hf"]), tmp_path / "ckpt")
    damage, match = BAD[case]
    damage(path)
    with pytest.raises(CheckpointError, match=match) as err:
        d.from_pretrained(path)
    lines = str(err.value).splitlines()
    assert all(len(line) < 300 for line in lines)
    if case in ("missing shard", "truncated file"):
        assert len(lines) == 1
    if case == "changed head count":  # every wrongly shaped tensor, one line each, before anything is built
        assert lines[0].endswith("nothing was loaded:") and len(lines) > 5


# ---- the CLI: inspect, and exit 2 for a bad checkpoint ----------------------------------------------

def test_inspect_reads_headers_only(written, tmp_path, capsys):
    from dsv4_compile.checkpoint.summary import describe
    from dsv4_compile.cli import main

    hf = describe(written["hf"])
    inf = describe(written["inference"])
    assert (hf["layout"], hf["shards"], inf["layout"], inf["model_parallel"]) == ("huggingface", 3, "inference", 2)
    assert hf["hash_routed_layers"] == list(range(CONFIG.n_hash_layers)) and hf["mtp_weights"]
    assert set(hf["dtypes"]) == {"BF16", "F32", "F8_E4M3", "F8_E8M0", "I64", "I8"}
    assert hf["config"]["attention"] == {"window": 1, "CSA": 1, "HCA": 1}
    assert hf["bytes"] == sum(f.stat().st_size for f in Path(written["hf"]).glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in Path(written["hf"]).glob("*.safetensors"))
    # headers only: scrambling every tensor's bytes changes nothing in the summary
    path = _copy(Path(written["hf"]), tmp_path / "scrambled")
    for f in path.glob("*.safetensors"):
        raw = bytearray(f.read_bytes())
        start = 8 + int.from_bytes(raw[:8], "little")
        raw[start:] = bytes(len(raw) - start)
        f.write_bytes(bytes(raw))
    def same(s):
        return {k: v for k, v in s.items() if k != "path"} | {"config": dict(s["config"], name=None)}
    assert same(describe(path)) == same(hf)
    assert main(["inspect", str(written["inference"])]) == 0
    out = capsys.readouterr().out
    assert "inference layout" in out and "hash-routed layers (tid2eid): 0, 1" in out and "experts fp4" in out


@pytest.mark.parametrize("case", ["missing shard", "truncated file"])
def test_cli_refuses_bad_checkpoints_with_exit_2(case, written, tmp_path, capsys):
    from dsv4_compile.cli import main

    path = _copy(Path(written["hf"]), tmp_path / "ckpt")
    BAD[case][0](path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


# ---- build --weights DIR --------------------------------------------------------------------------

def _build_plan(argv, cwd, monkeypatch):
    import argparse

    from dsv4_compile.build import add_arguments
    from dsv4_compile.plan import Plan

    monkeypatch.chdir(cwd)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return Plan(parser.parse_args(["--gpu", "cpu", "--context", "128", *argv]))


def test_build_plan_takes_config_and_weights_from_a_checkpoint(written, tmp_path, monkeypatch):
    plan = _build_plan(["--weights", str(written["inference"])], tmp_path, monkeypatch)
    assert plan.config == CONFIG.replace(max_batch_size=1)  # the release's config.json has no batch size
    assert plan.weights["source"] == "checkpoint"
    ref = d.from_pretrained(written["inference"], weights="bf16", dtype=plan.config.dtype).state_dict()
    assert plan.state.keys() == ref.keys() and all(torch.equal(plan.state[k], ref[k]) for k in ref)
    model = plan.model(128)
    assert torch.equal(model.head.weight, ref["head.weight"])
    # the identity changes with the checkpoint's headers, not with a re-read
    again = _build_plan(["--weights", str(written["inference"])], tmp_path, monkeypatch)
    assert again.weights == plan.weights


@pytest.mark.parametrize("case", list(BAD))
def test_build_refuses_a_bad_checkpoint_with_exit_2(case, written, tmp_path, monkeypatch, capsys):
    from dsv4_compile.cli import main

    path = _copy(Path(written["hf"]), tmp_path / "ckpt")
    BAD[case][0](path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["build", "--gpu", "cpu", "--context", "128", "--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dsv4_compile build: error:" in err and re.search(BAD[case][1], err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_writer_refuses_models_as_shipped_and_bad_splits_before_writing(tmp_path):
    """A model holding weights as shipped (its FP8 / MXFP4 codes would be quantized again as values) and an
    mp that does not divide the experts are one-line ValueErrors, with no folder made."""
    shipped = quantize_as_shipped(d.Transformer(CONFIG, seed=0))
    with pytest.raises(ValueError, match=r"write_checkpoint: layers\.0\.attn\.\S+ is FP8Linear, weights as shipped; "
                                         r"accepted: a plain model"):
        write_checkpoint(shipped, tmp_path / "shipped")
    with pytest.raises(ValueError, match=f"mp 3: must divide n_routed_experts \\({CONFIG.n_routed_experts}\\)"):
        write_checkpoint(d.Transformer(CONFIG, seed=0), tmp_path / "mp3", layout="inference", mp=3)
    assert list(tmp_path.iterdir()) == []
