"""`bench` refuses clearly where it cannot run (no GPU here) and resolves --ops like --passes."""
import pytest
import torch

from dsv4_compile.bench import FAMILIES, _families
from dsv4_compile.cli import UsageError, main


def test_ops_aliases_expand_to_substitution_families():
    assert _families("attention") == ["sparse_attention", "sparse_attention_cached"]
    assert _families("quant,newton_schulz,fp8_quantize") == ["fp8_quantize", "fp4_quantize", "newton_schulz"]
    assert set(_families("all")) == set(FAMILIES)
    assert _families("moe") == ["moe_experts", "moe_experts_fp8", "moe_experts_fp8_w8a8", "moe_experts_mxfp4",
                                "moe_experts_mxfp4_w4a8"]
    with pytest.raises(UsageError, match="unknown 'flash'; accepted: all, attention"):
        _families("flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
@pytest.mark.parametrize("argv, message", [
    (["bench", "--ops", "nope"], "--ops: unknown 'nope'"),
    (["bench", "--gpu", "H100"], "gpu 'H100' requested but no CUDA device is visible"),
    (["bench"], "no CUDA GPU here"),
    (["bench", "--context", "8q"], "bad context length '8q'"),
])
def test_refusals_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_installed_package_without_checkout_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    """Installed from a wheel there is no bench/ beside the package: exit 2, one line, nothing run."""
    import importlib

    import dsv4_compile.bench as bench

    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path / "bench")
    # as on a GPU machine (the module: dsv4_compile.compile is also the name of the function)
    monkeypatch.setattr(importlib.import_module("dsv4_compile.compile"), "resolve_gpu", lambda gpu: "H100")
    assert main(["bench", "--ops", "attention"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ship with the source checkout" in err and "pip install -e ." in err and "\n" not in err
