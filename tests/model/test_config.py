import pytest
import yaml

from dsv4_compile import ConfigError, ModelConfig, preset_names


def test_presets_load_with_their_published_shapes():
    assert set(preset_names()) >= {"tiny", "mini", "flash", "pro"}
    flash, pro, mini = (ModelConfig.from_preset(n) for n in ("flash", "pro", "mini"))
    assert (flash.n_layers, flash.dim, flash.n_heads, flash.n_routed_experts, flash.index_topk) == (43, 4096, 64, 256, 512)
    assert (pro.n_layers, pro.dim, pro.n_heads, pro.n_routed_experts, pro.index_topk) == (61, 7168, 128, 384, 1024)
    assert flash.compress_ratios == (0, 0) + (4, 128) * 20 + (4,)
    assert pro.compress_ratios == (128, 128) + (4, 128) * 29 + (4,)
    assert (mini.dim, mini.n_heads, mini.head_dim, mini.index_n_heads, mini.index_head_dim, mini.window_size) == \
        (4096, 64, 512, 64, 128, 128)
    assert set(mini.compress_ratios) == {0, 4, 128} and mini.n_routed_experts == 8
    tiny = ModelConfig.from_preset("tiny")
    assert set(tiny.compress_ratios) == {0, 4, 128} and tiny.layer_ratios[-1] == 0  # MTP block: window only


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, key", [
    ({"hidden": 64}, "hidden"),                                   # unknown key
    ({"dim": "64"}, "dim"),                                       # wrong type
    ({"dim": 64.5}, "dim"),
    ({"compress_ratios": [0, 4, 64, 4]}, "compress_ratios"),      # ratio not in {0, 4, 128}
    ({"compress_ratios": [0, 4]}, "compress_ratios"),             # one per layer
    ({"head_dim": 100}, "head_dim"),                              # non-rope dims not a multiple of 64
    ({"o_groups": 3}, "o_groups"),                                # must divide n_heads
    ({"n_activated_experts": 9}, "n_activated_experts"),
    ({"dtype": "float16"}, "dtype"),
    ({"max_seq_len": 300}, "max_seq_len"),                        # not a multiple of 128
    ({"index_head_dim": 48}, "index_head_dim"),                   # Hadamard needs a power of two
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_yaml_names_the_key(tmp_path, change, key):
    data = ModelConfig.from_preset("tiny").to_dict()
    data.pop("name")
    data.update(change)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_yaml(_write(tmp_path, data))
    message = str(err.value)
    assert f"'{key}'" in message and "\n" not in message


def test_unknown_preset_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match="unknown; accepted presets: .*tiny"):
        ModelConfig.from_preset("huge")


def test_yaml_round_trip_and_hash(tmp_path):
    tiny = ModelConfig.from_preset("tiny")
    data = tiny.to_dict()
    data.pop("name")
    again = ModelConfig.from_yaml(_write(tmp_path, data))
    assert again == tiny and again.config_hash() == tiny.config_hash()
    assert tiny.replace(dim=128).config_hash() != tiny.config_hash()
