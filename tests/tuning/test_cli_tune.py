"""`python -m dsv4_compile tune`: usage errors (exit 2, one line) and a small real run on CPU."""
import subprocess
import sys

import yaml

from dsv4_compile.cli import main


def run_cli(capsys, *argv):
    code = main(["tune", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_absent_gpu_is_a_usage_error():
    # A fresh process: the real entry point, exit code and one line on stderr.
    proc = subprocess.run([sys.executable, "-m", "dsv4_compile", "tune", "--gpu", "H100", "--context", "8k"],
                          capture_output=True, text=True)
    if proc.returncode == 0:  # pragma: no cover - an H100 machine
        return
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "gpu 'H100' requested but" in proc.stderr


def test_usage_errors(capsys):
    code, _, err = run_cli(capsys, "--gpu", "cpu", "--context", "8k")
    assert code == 2 and "--cost standin" in err
    code, _, err = run_cli(capsys, "--gpu", "cpu", "--cost", "standin", "--kernels", "fp8_quantize,bogus")
    assert code == 2 and "unknown kernel(s) bogus" in err and "fp8_quantize" in err
    code, _, err = run_cli(capsys, "--gpu", "cpu", "--cost", "cuda")
    assert code == 2 and "needs a CUDA GPU" in err
    code, _, err = run_cli(capsys, "--gpu", "cpu", "--cost", "standin", "--context", "8q")
    assert code == 2 and "bad context length" in err
    code, _, err = run_cli(capsys, "--gpu", "cpu", "--cost", "standin", "--trials", "0")
    assert code == 2 and "--trials" in err


def test_standin_run_on_cpu_writes_the_table(capsys, tmp_path):
    """--gpu cpu --cost standin: the gate runs the real FP8 kernel in the Triton interpreter."""
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    argv = ["--gpu", "cpu", "--cost", "standin", "--context", "8k,32k", "--kernels", "fp8_quantize", "--trials", "3",
            "--storage", storage, "--tables-dir", str(tmp_path / "tables"), "--no-plots", "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["kernel", "bucket", "measured"]
    assert [line.split()[:3] for line in lines[1:3]] == [["fp8_quantize", "8k", "3"], ["fp8_quantize", "32k", "3"]]
    assert f"table: {tmp_path / 'tables' / 'cpu.yaml'}" in out
    table = yaml.safe_load((tmp_path / "tables" / "cpu.yaml").read_text())
    assert set(table["kernels"]["fp8_quantize"]) == {"8k", "32k"}
    assert "stand-in" in table["kernels"]["fp8_quantize"]["8k"]["device"]
    # Again with --json: resumed (nothing to run), the same best configs.
    code, out, _ = run_cli(capsys, *argv, "--json")
    import json

    data = json.loads(out)
    assert code == 0 and [s["measured"] for s in data["studies"]] == [3, 3]
    assert [s["best_params"] for s in data["studies"]] == [e["config"] for e in table["kernels"]["fp8_quantize"].values()]


def test_standin_output_stays_out_of_the_package(capsys, tmp_path, monkeypatch):
    """A stand-in run without --tables-dir/--storage writes ./standin-tables/ (table, studies, plots),
    never the package's tuned tables or studies (issue 19: nothing for a wheel to pack)."""
    from dsv4_compile.tuning.storage import DEFAULT_DB
    from dsv4_compile.tuning.tables import TABLES_DIR

    def package_state():
        return sorted((p.name, p.stat().st_mtime_ns) for p in TABLES_DIR.rglob("*")), \
            DEFAULT_DB.exists() and DEFAULT_DB.stat().st_mtime_ns

    before = package_state()
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "--gpu", "cpu", "--cost", "standin", "--context", "8k", "--kernels",
                             "fp8_quantize", "--trials", "1", "--no-progress")
    assert code == 0, err
    assert "tables standin-tables" in err
    assert (tmp_path / "standin-tables" / "cpu.yaml").is_file() and (tmp_path / "standin-tables" / "studies.db").is_file()
    assert package_state() == before


def test_timeout_flag(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--gpu", "cpu", "--cost", "standin", "--timeout", "0")
    assert code == 2 and "--timeout" in err and "seconds > 0" in err
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    code, out, err = run_cli(capsys, "--gpu", "cpu", "--cost", "standin", "--context", "8k", "--kernels", "hc_sinkhorn",
                             "--trials", "1000", "--timeout", "1.5", "--storage", storage,
                             "--tables-dir", str(tmp_path / "tables"), "--no-plots", "--no-progress")
    assert "timeout 1.5 s" in err
    assert code == 0, err
    assert (tmp_path / "tables" / "cpu.yaml").exists() and (tmp_path / "studies.db").exists()
