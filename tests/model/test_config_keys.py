"""Configs a user can write: valid defaults, `base:`, every key documented from the dataclass."""
import dataclasses
from pathlib import Path

import pytest

from dsv4_compile.model.config import ConfigError, ModelConfig, keys_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_empty_yaml_is_a_valid_config(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    config = ModelConfig.load(str(tmp_path / "empty.yaml"))
    assert config == ModelConfig.from_dict({}) and config.name == "empty"


def test_base_starts_from_a_preset_and_the_file_overrides(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: tiny\nmax_seq_len: 1024\ndtype: bfloat16\n")
    mine, tiny = ModelConfig.load(str(tmp_path / "mine.yaml")), ModelConfig.from_preset("tiny")
    assert mine == tiny.replace(max_seq_len=1024, dtype="bfloat16") and mine.name == "mine"
    # a YAML base, relative to the file, chained
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.yaml").write_text("base: ../mine.yaml\nn_mtp_layers: 0\n")
    assert ModelConfig.load(str(tmp_path / "sub" / "more.yaml")) == mine.replace(n_mtp_layers=0)


@pytest.mark.parametrize("text, message", [
    ("base: nosuch\n", "'nosuch' is neither a preset"),
    ("base: 3\n", "3 is not a preset name or a YAML file"),
    ("base: loop.yaml\n", "part of a cycle of bases"),
    ("base: tiny\nhead_dim: 100\n", "config key 'head_dim'"),
])
def test_bad_base_is_one_line(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig.load(str(tmp_path / "loop.yaml"))
    assert "\n" not in str(err.value)


def test_every_key_is_documented_and_the_doc_is_current():
    documented = [f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("doc")]
    assert documented == [f.name for f in dataclasses.fields(ModelConfig) if f.name != "name"]
    assert keys_reference() in DOC.read_text(), "docs/CONFIG.md is stale: regenerate its table from keys_reference()"
