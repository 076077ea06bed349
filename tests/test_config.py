"""Config loading and the command line: bad input fails fast with the key named, exit code 2."""

import os
import subprocess
import sys

import pytest

from jobs.adapt.config import select_layers
from orchestrator.cli import main
from orchestrator.config import load_config, to_yaml
from jobs.core.errors import UserError

from .conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_configs_load():
    for name in ("tiny.yaml", "quickstart.yaml", "prefixlm_distill.yaml"):
        job = load_config(os.path.join(REPO, "configs", name))
        assert job.adapt.source.startswith("builtin:")
    assert load_config(TINY).adapt.max_shard_mb == 1


def test_overrides_apply_and_are_typed():
    job = load_config(TINY, ["adapt.encoder_layers=every:2", "adapt.encoder_scale=0.5", "adapt.seed=7"])
    assert (job.adapt.encoder_layers, job.adapt.encoder_scale, job.adapt.seed) == ("every:2", 0.5, 7)


def test_unknown_key_is_named_with_suggestion(tmp_path):
    path = write(tmp_path, "name: x\nadapt:\n  source: builtin:tiny-gemma3\n  encoder_layer: all\n")
    with pytest.raises(UserError, match=r"unknown config key adapt\.encoder_layer .*did you mean adapt\.encoder_layers\?"):
        load_config(path)


def test_unknown_override_is_named():
    with pytest.raises(UserError, match=r"unknown config key adapt\.dtpye.*did you mean adapt\.dtype\?"):
        load_config(TINY, ["adapt.dtpye=float32"])


def test_unknown_top_level_key():
    with pytest.raises(UserError, match=r"unknown config key adapter .*did you mean adapt\?"):
        load_config(TINY, ["adapter.source=x"])


def test_wrong_type_names_key():
    with pytest.raises(UserError, match=r"adapt\.max_shard_mb"):
        load_config(TINY, ["adapt.max_shard_mb=lots"])


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(UserError, match=r"adapt\.source is required"):
        load_config(path)


def test_cross_field_checks_name_key_and_value():
    with pytest.raises(UserError, match=r"adapt\.encoder_layers='every:0' is not a layer selection"):
        load_config(TINY, ["adapt.encoder_layers=every:0"])
    with pytest.raises(UserError, match=r"adapt\.dtype='int8' is not supported"):
        load_config(TINY, ["adapt.dtype=int8"])
    with pytest.raises(UserError, match=r"adapt\.encoder_scale=1\.5 must be in \[0, 1\]"):
        load_config(TINY, ["adapt.encoder_scale=1.5"])
    with pytest.raises(UserError, match=r"name='a b' must be"):
        load_config(TINY, ["name=a b"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"override 'adapt\.dtype' must look like key=value"):
        load_config(TINY, ["adapt.dtype"])
    with pytest.raises(UserError, match=r"config file not found: .*nope\.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match=r"is not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))


def test_layer_selection():
    assert select_layers("all", 4, "k") == [0, 1, 2, 3]
    assert select_layers("every:3", 7, "k") == [0, 3, 6]
    assert select_layers("first:2", 5, "k") == [0, 1]
    assert select_layers("last:2", 5, "k") == [3, 4]
    assert select_layers("4, 0,2", 5, "k") == [4, 0, 2]
    with pytest.raises(ValueError, match=r"adapt\.decoder_layers='0,9' names layer\(s\) \[9\]"):
        select_layers("0,9", 5, "adapt.decoder_layers")
    with pytest.raises(ValueError, match=r"asks for 6 layers but the source has 5"):
        select_layers("first:6", 5, "k")


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", TINY, "adapt.decoder_layers=first:3"]) == 0
    out = capsys.readouterr().out
    assert "decoder_layers: first:3" in out and "encoder_scale: 1.0" in out
    assert out == to_yaml(load_config(TINY, ["adapt.decoder_layers=first:3"]))


def test_cli_user_error_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", "show", TINY, "adapt.nope=1"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "t5adapt: error: unknown config key adapt.nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_help():
    for argv in (["--help"], ["adapt", "--help"], ["prepare", "--help"], ["config", "--help"], ["config", "show", "--help"]):
        result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "usage: t5adapt" in result.stdout
    assert "builtin:gemma3-270m" in subprocess.run([sys.executable, "-m", "orchestrator.cli", "adapt", "--help"],
                                                   cwd=REPO, capture_output=True, text=True).stdout
    prepare_help = subprocess.run([sys.executable, "-m", "orchestrator.cli", "prepare", "--help"],
                                  cwd=REPO, capture_output=True, text=True).stdout
    assert "--corpus" in prepare_help and "RAY_ADDRESS" in prepare_help
