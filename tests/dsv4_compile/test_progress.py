"""Build progress: a ticker while a step runs (spinner on a terminal, plain heartbeat lines otherwise)."""
from __future__ import annotations

import io
import time
import warnings

from dsv4_compile.steps import Progress, known_export_warnings_silenced


def test_plain_heartbeat_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(out, heartbeat_s=0.05)
    progress.start("compile", "detail")
    time.sleep(0.3)
    progress.done("ok")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[3/6] compile: detail ..."
    beats = [line for line in lines if "still running" in line]
    assert len(beats) >= 2 and "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert lines[-1].startswith("      compile done in ") and lines[-1].endswith(" s (ok)")
    time.sleep(0.15)
    assert out.getvalue().splitlines()[-1] == lines[-1], "the ticker went on after done()"


def test_spinner_on_a_terminal_is_cleared_before_real_lines():
    out = io.StringIO()
    progress = Progress(out, live=True)
    progress.start("export")
    time.sleep(0.5)
    progress.note("a note")
    progress.stop()
    text = out.getvalue()
    assert "\r      | export 0 s" in text or "\r      / export 0 s" in text
    assert "\r\033[K      a note\n" in text
    time.sleep(0.3)
    assert out.getvalue() == text, "the ticker went on after stop()"


def test_known_export_warnings_are_silenced_and_others_kept():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with known_export_warnings_silenced():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
            warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else"]


def test_onnx_exporter_torchvision_lines_are_silenced(caplog):
    """The ONNX exporter logs one `torchvision is not installed. Skipping torchvision::<op>` line per op
    on every export without torchvision: logged outside the context (when torchvision is absent), not inside."""
    import importlib.util
    import logging

    import torch

    def export() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            torch.onnx.export(torch.export.export(torch.nn.Linear(3, 2), (torch.ones(1, 3),)), (torch.ones(1, 3),),
                              dynamo=True, optimize=False, verbose=False)
        return [r.getMessage() for r in caplog.records if "torchvision" in r.getMessage()]

    with known_export_warnings_silenced():
        assert export() == []
    if importlib.util.find_spec("torchvision") is None:
        assert any("Skipping torchvision::nms" in m for m in export()), "the exporter no longer logs it: drop the filter"


def test_a_build_refused_in_the_middle_of_a_step_stops_its_ticker(monkeypatch, tmp_path, capsys):
    """`build --format bogus` is refused while its validate step runs (exit 2): the step's ticker must not
    outlive the command (it would print "still running" into whatever the stream has become)."""
    from dsv4_compile import build
    from dsv4_compile.cli import main as cli_main

    made = []

    class Recorded(Progress):
        def __init__(self, stream, **kwargs):
            super().__init__(stream, **kwargs)
            made.append(self)

    monkeypatch.setattr(build, "Progress", Recorded)
    assert cli_main(["build", "--format", "bogus", "--out", str(tmp_path / "out")]) == 2
    assert len(made) == 1 and made[0]._step == "validate" and made[0]._stop is None
    assert "bogus" in capsys.readouterr().err


def test_a_refused_build_folder_fails_every_pending_engine_with_the_reason():
    """The build's verify step: the worker refused the folder before any engine ran (verify's
    check_error): each pending engine's verdict says why, not 'no result'; a decided one is kept."""
    from dsv4_compile.manifest import EngineRecord, Verification
    from dsv4_compile.steps import verify_engines

    def engine(fmt: str, status: str) -> EngineRecord:
        return EngineRecord(fmt, 512, (f"{fmt}/prefill-512",), (2, 512), (1, 2), True, "float32", {},
                            Verification(status))

    outcome = {"where": "fresh process", "check_error": "checksum mismatch for aoti/weights.safetensors", "results": []}
    done = verify_engines([engine("aoti", "pending"), engine("onnx", "unverified")], outcome, Progress(io.StringIO()))
    assert done[0].verified.status == "failed" and done[0].verified.error == outcome["check_error"]
    assert done[1].verified == Verification("unverified")
