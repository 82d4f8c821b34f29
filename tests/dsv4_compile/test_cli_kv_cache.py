"""The CLI skeleton (context parsing, exit codes, one-line errors) and the `kv-cache` command.

Commands run in-process through `main(argv)`; one test runs `python -m dsv4_compile kv-cache` end to end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dsv4_compile import cli
from dsv4_compile.cli import main
from dsv4_compile.model.context import ContextError, format_context, parse_context_length, parse_context_lengths
from dsv4_compile.kv_report import SEED_V3_2, SEED_V4_PRO, context_report
from dsv4_compile.model.config import ModelConfig

N_1M = 1024 * 1024


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ---- context parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,tokens", [
    ("8k", 8192), ("32K", 32768), ("128k", 131072), ("1m", N_1M), ("1M", N_1M), ("4096", 4096),
    (" 16k ", 16384), ("1", 1), ("3m", 3 * N_1M),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_parse_context_length_good(text, tokens):
    assert parse_context_length(text) == tokens


@pytest.mark.parametrize("text", ["", "k", "8q", "1.5k", "-8k", "0", "0k", "8kb", "1g", "8 k", "8k8", "1e6"],
                         ids=repr)
def test_parse_context_length_bad(text):
    with pytest.raises(ContextError, match="bad context length.*suffix k \\(x1024\\) or m \\(x1048576\\)"):
        parse_context_length(text)


def test_parse_context_lengths():
    assert parse_context_lengths("8k,32k,128k,1m") == [8192, 32768, 131072, N_1M]
    assert parse_context_lengths("1m, 8k") == [N_1M, 8192]  # order kept, spaces allowed


@pytest.mark.parametrize("text", ["", ",", "8k,", "8k,,1m", " "], ids=repr)
def test_parse_context_lengths_bad(text):
    with pytest.raises(ContextError, match="bad context list"):
        parse_context_lengths(text)


@pytest.mark.parametrize("tokens,text", [(8192, "8k"), (N_1M, "1m"), (1000, "1000"), (3 * 1024, "3k")])
def test_format_context(tokens, text):
    assert format_context(tokens) == text and parse_context_length(text) == tokens


# ---- exit codes and one-line errors -------------------------------------------------------------

def test_unknown_preset(capsys):
    code, out, err = run_cli(capsys, "kv-cache", "--config", "nosuch", "--context", "8k")
    assert_usage_error(code, err, "'nosuch'", "pro", "tiny")
    assert out == ""


@pytest.mark.parametrize("context", ["8q", "8k,,1m", "0", "1.5k"])
def test_bad_context(capsys, context):
    code, _, err = run_cli(capsys, "kv-cache", "--context", context)
    assert_usage_error(code, err, "--context", "k (x1024)")


def test_bad_yaml(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dim: [1, 2\nn_layers: 4\n")
    code, _, err = run_cli(capsys, "kv-cache", "--config", str(path))
    assert_usage_error(code, err, "broken.yaml", "not valid YAML")


def test_yaml_with_unknown_key(capsys, tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("dimm: 64\n")
    code, _, err = run_cli(capsys, "kv-cache", "--config", str(path))
    assert_usage_error(code, err, "'dimm'", "accepted keys")


@pytest.mark.parametrize("argv,needles", [
    (["nosuch-command"], ["invalid choice", "kv-cache"]),
    ([], ["missing command", "kv-cache"]),
    (["kv-cache", "--batch", "0"], ["--batch", ">= 1"]),
    (["kv-cache", "--indexer-format", "fp6"], ["--indexer-format", "fp4", "fp8"]),
    (["kv-cache", "--bogus"], ["unrecognized arguments: --bogus"]),
], ids=["unknown-command", "no-command", "batch-0", "indexer-fp6", "unknown-option"])
def test_other_usage_errors(capsys, argv, needles):
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, *needles)


def test_help_exits_0(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "kv-cache" in out
    code, out, _ = run_cli(capsys, "kv-cache", "--help")
    assert code == 0 and "--indexer-format" in out


@pytest.fixture
def failing_command(monkeypatch):
    """A registered command whose run() hits a bug."""
    module = types.ModuleType("fake_failing_command")
    module.add_arguments = lambda parser: None

    def run(args):
        raise RuntimeError("boom\nsecond line")

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fail", cli.Command(module.__name__, "always fails"))


def test_internal_error_is_exit_1_one_line(capsys, failing_command):
    code, _, err = run_cli(capsys, "fail")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "RuntimeError: boom; second line" in err and "--debug" in err


@pytest.mark.parametrize("argv", [["--debug", "fail"], ["fail", "--debug"]], ids=["before", "after"])
def test_internal_error_traceback_with_debug(capsys, failing_command, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "Traceback" in err and "RuntimeError" in err


# ---- the report's numbers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pro() -> ModelConfig:
    return ModelConfig.from_preset("pro")


def test_pro_1m_report_matches_hand_formula(pro):
    r = context_report(pro, N_1M)
    n_csa, n_hca = N_1M // 4, N_1M // 128  # 262144 and 8192 entries
    csa_layer = n_csa * 584 + n_csa * 68 + 128 * 584 + (8 * 1024 + 8 * 256) * 4 * 2
    hca_layer = n_hca * 584 + 128 * 584 + 128 * 512 * 4 * 2
    assert r.layers == {"window": 1, "csa": 30, "hca": 31}
    assert r.parts["csa"] == {"window": 30 * 128 * 584, "compressed": 30 * n_csa * 584, "indexer": 30 * n_csa * 68,
                              "compressor_state": 30 * (8 * 1024 + 8 * 256) * 4 * 2}
    assert r.kind_bytes("csa") == 30 * csa_layer
    assert r.kind_bytes("hca") == 31 * hca_layer
    assert r.kind_bytes("window") == 128 * 584
    assert r.total_bytes == 30 * csa_layer + 31 * hca_layer + 128 * 584 == 5_299_189_760
    assert r.compressed_entries == 30 * n_csa + 31 * n_hca
    # the reconciliation steps are a partition of the total
    assert sum(b for _, b in r.reconciliation()) == r.total_bytes
    assert r.reconciliation()[0][1] == (30 * n_csa + 31 * n_hca) * 576
    assert r.seed_v4_pro == 4464 and r.ratio_to_seed == pytest.approx(5_299_189_760 / 2**20 / 4464)


def test_fp8_indexer_switch(pro):
    fp4, fp8 = context_report(pro, N_1M, indexer_format="fp4"), context_report(pro, N_1M, indexer_format="fp8")
    assert fp4.index_entry_bytes == 68 and fp8.index_entry_bytes == 132
    assert fp8.part_bytes("indexer") == 30 * (N_1M // 4) * 132
    assert fp8.total_bytes - fp4.total_bytes == 30 * (N_1M // 4) * (132 - 68)
    for part in ("window", "compressed", "compressor_state"):
        assert fp8.part_bytes(part) == fp4.part_bytes(part)


def test_fp8_switch_through_cli(capsys):
    code, out, _ = run_cli(capsys, "kv-cache", "--context", "1m", "--indexer-format", "fp8", "--json")
    data = json.loads(out)
    assert code == 0 and data["indexer_format"] == "fp8" and data["entry_bytes"]["indexer"] == 132
    assert data["contexts"][0]["bytes"]["csa"]["indexer"] == 30 * (N_1M // 4) * 132


def test_json_output(capsys):
    code, out, err = run_cli(capsys, "kv-cache", "--config", "pro", "--context", "8k,32k,128k,1m", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["config"] == "pro" and data["batch"] == 1
    assert [c["max_seq_len"] for c in data["contexts"]] == [8192, 32768, 131072, N_1M]
    last = data["contexts"][-1]
    assert last["total_bytes"] == 5_299_189_760 and last["total_MiB"] == pytest.approx(5053.70, abs=0.01)
    assert last["seed"]["v4_pro"] == 4464 and last["seed"]["v3_2"] == 47092
    assert sum(s["bytes"] for s in last["seed"]["reconciliation_bytes"]) == last["total_bytes"]


def test_text_output_pro(capsys):
    code, out, _ = run_cli(capsys, "kv-cache", "--config", "pro", "--context", "8k,1m")
    assert code == 0
    assert "seed V4-Pro" in out and "5053.7" in out and "4464" in out and "47092" in out
    for label in ("window-only", "CSA", "HCA", "window ring", "compressed entries", "indexer keys", "compressor state"):
        assert label in out


def test_batch_multiplies_and_hides_seed(pro):
    one, four = context_report(pro, 8192), context_report(pro, 8192, batch=4)
    assert four.total_bytes == 4 * one.total_bytes
    assert one.seed_v4_pro == 55 and four.seed_v4_pro is None  # the seed figures are per sequence


def test_seed_only_for_pro_at_seed_contexts(pro, capsys):
    assert context_report(pro, 65536).seed_v4_pro is None
    assert context_report(ModelConfig.from_preset("flash"), N_1M).seed_v4_pro is None
    code, out, _ = run_cli(capsys, "kv-cache", "--config", "flash", "--context", "8k,1m")
    assert code == 0 and "seed" not in out


def test_context_that_is_not_a_bucket_is_refused(capsys):
    """One rule for --context in build, kv-cache and tune (model/context.py): 1000 and 5m are refused."""
    with pytest.raises(ContextError, match="unsupported context 1000 .*multiples of 128"):
        context_report(ModelConfig.from_preset("tiny"), 1000)
    for context in ("1000", "5m"):
        code, _, err = run_cli(capsys, "kv-cache", "--config", "tiny", "--context", context)
        assert_usage_error(code, err, "--context", "multiples of 128")


def test_seed_v3_2_is_mib_of_772_bytes_per_token_and_layer():
    """The evidence for reading the article's "MB" as MiB (see kv_report's docstring)."""
    for tokens, seed in SEED_V3_2.items():
        assert int(61 * 772 * tokens / 2**20 + 0.5) == seed  # rounded half up: 128k is 5886.5 exactly
    assert set(SEED_V3_2) == set(SEED_V4_PRO)


def test_readme_shows_the_real_output(capsys):
    """README's KV-cache section must be this command's current output (refresh it if this fails)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code, out, _ = run_cli(capsys, "kv-cache", "--config", "pro", "--context", "8k,32k,128k,1m")
    assert code == 0 and f"```\n{out}```" in readme


# ---- end to end ---------------------------------------------------------------------------------------

def test_python_m_kv_cache_subprocess():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "dsv4_compile", "kv-cache", "--config", "pro", "--context", "8k,32k,128k,1m"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "5053.7" in proc.stdout and "4464" in proc.stdout and "61.6" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "dsv4_compile", "kv-cache", "--context", "8q"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("context, message", [("100", "unsupported context 100 (100 tokens); accepted: multiples of 128"),
                                              ("5m", "unsupported context 5m"), ("8q", "bad context length '8q'")])
@pytest.mark.parametrize("command", [["build"], ["kv-cache"], ["tune", "--gpu", "cpu", "--cost", "standin"], ["bench"]])
def test_one_meaning_of_context_in_every_command(capsys, command, context, message):
    code, _, err = run_cli(capsys, *command, "--context", context)
    assert_usage_error(code, err, "--context", message)
