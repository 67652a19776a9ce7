"""The variables that tune a worker are read strictly: a value they do not take stops the
command at its start with one line naming the variable (exit 2), before anything is read or
written; unset or empty is the default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.knobs import SettingError, env_choice, env_int
from envmgr.worker.hydrate import hydrate

ENV_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("text", ["abc", "1.5", "1e3", "0x10", "-1", "65", "99999", "4 streams"])
def test_a_number_out_of_its_range_or_not_one_is_refused(monkeypatch, text):
    monkeypatch.setenv("ENVMGR_LAYER_STREAMS", text)
    with pytest.raises(SettingError) as raised:
        env_int("ENVMGR_LAYER_STREAMS", 2, low=1, high=64)
    assert raised.value.exit_code == 2
    assert str(raised.value).startswith(f"ENVMGR_LAYER_STREAMS={text!r} is not a whole number")


@pytest.mark.parametrize(("text", "value"), [("", 2), ("  ", 2), ("1", 1), (" 64 ", 64)])
def test_unset_or_empty_is_the_default_and_spaces_around_a_value_are_no_error(
    monkeypatch, text, value
):
    monkeypatch.setenv("ENVMGR_LAYER_STREAMS", text)
    assert env_int("ENVMGR_LAYER_STREAMS", 2, low=1, high=64) == value
    monkeypatch.delenv("ENVMGR_LAYER_STREAMS")
    assert env_int("ENVMGR_LAYER_STREAMS", 2, low=1, high=64) == 2


@pytest.mark.parametrize("text", ["Copy", "COPY", "copies", "hard-link", "0", "true"])
def test_a_link_mode_is_one_of_its_words_exactly(monkeypatch, text):
    monkeypatch.setenv("ENVMGR_LINK", text)
    with pytest.raises(SettingError, match=r"ENVMGR_LINK=.* is not one of hardlink, copy"):
        env_choice("ENVMGR_LINK", ("hardlink", "copy"), "hardlink")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ENVMGR_LINK", "Copy"),
        ("ENVMGR_LAYER_STREAMS", "0"),
        ("ENVMGR_LAYER_PROCESS", "yes"),
    ],
)
def test_a_hydrate_with_a_bad_setting_reads_and_writes_nothing(monkeypatch, tmp_path, name, value):
    """The setting is checked before the store is read (the env is not even there) and
    before the host cache is made."""
    monkeypatch.setenv(name, value)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(SettingError, match=name):
        hydrate(ENV_ID, store, tmp_path / "cache", platform="linux-64")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("name", "value"), [("ENVMGR_S3_RETRIES", "x"), ("ENVMGR_S3_PARTS", "-1")])
def test_an_s3_store_checks_its_settings_when_made_not_at_its_first_broken_read(
    monkeypatch, name, value
):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError, match=name):
        S3Store("s3://bucket/envs")


def test_the_worker_says_which_variable_in_one_line_and_exits_2(tmp_path):
    cache = tmp_path / "cache"
    ran = subprocess.run(
        [sys.executable, "-m", "envmgr.bootstrap", "--store", str(tmp_path / "store"),
         "--env-id", ENV_ID, "--cache-dir", str(cache)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "ENVMGR_LINK": "Copy"},
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.splitlines() == [
        "envmgr: error: ENVMGR_LINK='Copy' is not one of hardlink, copy "
        "(fix it, or unset it for hardlink)"
    ]
    assert not cache.exists()
