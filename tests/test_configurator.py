"""configurator.py: files and --key=value overrides, type coercion, unknown keys, secret masking.
Run: .venv/bin/python -m pytest -q tests/test_configurator.py"""
import json
import os

import pytest

from configurator import configure, masked, resolve_path, save_config

DEFAULTS = dict(beta=0.1, steps=10, name="run", compile=False, api_key="", layers=None)


def test_cli_overrides_and_coercion():
    cfg = configure(DEFAULTS, ["--beta=0", "--steps=3", "--compile=True", "--name=a=b", "--layers=[1, 2]"])
    assert cfg["beta"] == 0.0 and isinstance(cfg["beta"], float)
    assert cfg["steps"] == 3 and cfg["compile"] is True
    assert cfg["name"] == "a=b"  # split on the first '='
    assert cfg["layers"] == [1, 2]  # a None default accepts any type
    assert DEFAULTS["beta"] == 0.1  # defaults untouched


def test_bad_type_and_unknown_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="expects int"):
        configure(DEFAULTS, ["--steps=1.5"])
    with pytest.raises(ValueError, match="unknown config key 'stpes'.*valid keys: .*steps"):
        configure(DEFAULTS, ["--stpes=3"])
    bad = tmp_path / "bad.py"
    bad.write_text("import math\nbeta = math.log(2)\nlearnig_rate = 1e-3\n")
    with pytest.raises(ValueError, match="unknown config key 'learnig_rate' in .*bad.py"):
        configure(DEFAULTS, [str(bad)])
    with pytest.raises(ValueError, match="--key=value"):
        configure(DEFAULTS, ["--steps"])


def test_config_file_then_cli_order(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("steps = 7\nbeta = 1  # int for a float key\n")
    cfg = configure(DEFAULTS, [str(f), "--steps=8"])
    assert cfg["steps"] == 8 and cfg["beta"] == 1.0 and isinstance(cfg["beta"], float)


def test_path_resolved_from_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(resolve_path("configurator.py"), os.path.join(os.path.dirname(__file__), "..", "configurator.py"))
    with pytest.raises(FileNotFoundError):
        resolve_path("config/does_not_exist.py")


def test_secrets_masked(tmp_path):
    cfg = configure(DEFAULTS, ["--api_key=sk-secret"])
    assert masked(cfg)["api_key"] == "***"
    names = dict(hf_token="t", openai_key="k", password="p", max_new_tokens=8, judge_max_tokens=9, keyframes=3)
    assert masked(names) == dict(hf_token="***", openai_key="***", password="***", max_new_tokens=8,
                                 judge_max_tokens=9, keyframes=3)
    save_config(cfg, str(tmp_path / "config.json"))
    text = (tmp_path / "config.json").read_text()
    assert "sk-secret" not in text and json.loads(text)["steps"] == 10
