"""Passwords of the store URLs: ``${NAME}`` resolved from the environment, a written password
lifted out of the study config, every password shown as ``***`` (p3b_search.credentials).

The end-to-end check, a study whose stores take a password, is tests/cluster/test_secret_stores.py."""
from __future__ import annotations

import pickle
from urllib.parse import quote

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from p3b_search.credentials import MissingVariable, lift_password, redact_secrets, references, resolve_url
from p3b_search.study.loading import load_study
from p3b_search.study.sections import LIFTED_PASSWORDS

#: Any text a password may be, the characters URLs give a meaning to among them.
PASSWORDS = st.text(alphabet=st.one_of(st.sampled_from("@:/%?#&=+ ${}'\""),
                                       st.characters(blacklist_categories=("Cs",))), min_size=1)
#: Passwords written raw into a URL of a log line: anything but white space and quotes (which end a URL there).
RAW_PASSWORDS = st.text(alphabet=st.one_of(st.sampled_from("@:/%?#&=+${}"),
                                           st.characters(blacklist_categories=("Z", "C"),
                                                         blacklist_characters="'\"")), min_size=1)


def _url(password: str) -> str:
    return f"postgresql://p3b:{password}@db.example:5432/optuna"


# ----------------------------------------------------------------------------- resolution

def test_references_are_replaced_by_their_percent_encoded_values():
    url = "postgresql://${DB_USER}:${DB_PASSWORD}@db:5432/optuna"
    assert references(url) == ["DB_USER", "DB_PASSWORD"]
    environ = {"DB_USER": "p3b", "DB_PASSWORD": "p@ss:w/rd%"}
    assert resolve_url(url, "storage", environ) == "postgresql://p3b:p%40ss%3Aw%2Frd%25@db:5432/optuna"
    assert resolve_url("sqlite:///runs/s/optuna.db", "storage", {}) == "sqlite:///runs/s/optuna.db"


def test_an_unset_variable_names_the_setting_and_the_variable():
    with pytest.raises(MissingVariable) as error:
        resolve_url("postgresql://p3b:${P3B_DB_PASSWORD}@db/optuna", "tracking.uri", {})
    assert str(error.value) == ("tracking.uri: environment variable P3B_DB_PASSWORD is not set: export it "
                                "(the URL's ${P3B_DB_PASSWORD} stands for its value)")
    assert (error.value.field, error.value.name) == ("tracking.uri", "P3B_DB_PASSWORD")


@given(PASSWORDS)
def test_a_resolved_password_reaches_the_database_driver_as_given(password):
    resolved = resolve_url(_url("${P3B_DB_PASSWORD}"), "storage", {"P3B_DB_PASSWORD": password})
    parsed = make_url(resolved)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "p3b", password, "db.example", 5432, "optuna")


# ----------------------------------------------------------------------------- lifting

@given(PASSWORDS)
def test_a_written_password_is_lifted_out_and_comes_back_on_resolution(password):
    assume("${" not in password)
    lifted, given_password = lift_password(_url(quote(password, safe="")), "P3B_STORAGE_PASSWORD")
    assert lifted == _url("${P3B_STORAGE_PASSWORD}")
    assert given_password == password
    resolved = resolve_url(lifted, "storage", {"P3B_STORAGE_PASSWORD": given_password})
    assert make_url(resolved).password == password


@given(PASSWORDS)
def test_a_raw_password_is_lifted_whole(password):
    """Written without percent-encoding (``p@ss:w/rd``), up to the URL's last ``@``."""
    assume("${" not in password)
    lifted, _ = lift_password(_url(password), "P3B_STORAGE_PASSWORD")
    assert lifted == _url("${P3B_STORAGE_PASSWORD}")


@pytest.mark.parametrize("url", ["postgresql://p3b@db/optuna", "postgresql://db:5432/optuna", "http://mlflow:5000",
                                 "sqlite:////srv/a@b/optuna.db", "postgresql://p3b:${P3B_DB_PASSWORD}@db/optuna"])
def test_nothing_is_lifted_from_a_url_without_a_written_password(url):
    assert lift_password(url, "P3B_STORAGE_PASSWORD") == (url, None)


# ----------------------------------------------------------------------------- redaction

@given(PASSWORDS)
def test_a_percent_encoded_password_is_redacted(password):
    assert redact_secrets(_url(quote(password, safe=""))) == _url("***")


@given(RAW_PASSWORDS)
def test_a_raw_password_is_redacted_in_a_log_line(password):
    line = f"cannot connect to {_url(password)} (FATAL: password authentication failed for user \"p3b\")"
    assert redact_secrets(line) == f"cannot connect to {_url('***')} (FATAL: password authentication failed " \
                                   "for user \"p3b\")"
    assert redact_secrets(f"{_url(password)!r}") == repr(_url("***"))


@given(RAW_PASSWORDS, RAW_PASSWORDS)
def test_every_url_of_a_text_is_redacted_and_redaction_is_idempotent(first, second):
    text = f"storage {_url(first)}, tracking 'mysql://mlflow:{second}@db/mlflow' done"
    redacted = redact_secrets(text)
    assert redacted == f"storage {_url('***')}, tracking 'mysql://mlflow:***@db/mlflow' done"
    assert redact_secrets(redacted) == redacted


@pytest.mark.parametrize("text", ["http://mlflow:5000/#/experiments/1", "sqlite:////srv/runs/s/optuna.db",
                                  "postgresql://p3b@db:5432/optuna", "user p3b@db failed: FATAL: no"])
def test_text_without_a_url_password_is_left_as_it_is(text):
    assert redact_secrets(text) == text


# ----------------------------------------------------------------------------- the study config

def test_a_study_file_password_never_enters_the_config(tmp_path, monkeypatch):
    """A password written into ``storage`` or ``tracking.uri`` moves to the environment: the
    config, its YAML copy and its pickle (what Ray saves) hold a reference in its place."""
    for name in LIFTED_PASSWORDS.values():
        monkeypatch.setenv(name, "before")  # restored after the test
    path = tmp_path / "study.yaml"
    path.write_text(f"name: s\noutput_dir: {tmp_path / 'runs'}\n"
                    "storage: postgresql://p3b:s3cr%40t@db:5432/optuna\n"
                    "tracking: {uri: 'postgresql://mlflow:an0ther@db:5432/mlflow'}\n")
    study = load_study(path)
    assert study.storage == "postgresql://p3b:${P3B_STORAGE_PASSWORD}@db:5432/optuna"
    assert study.tracking_uri == "postgresql://mlflow:${P3B_TRACKING_PASSWORD}@db:5432/mlflow"
    copy = yaml.safe_dump(study.model_dump(mode="json")).encode()
    for secret in (b"s3cr", b"an0ther"):
        assert secret not in copy and secret not in pickle.dumps(study)
    assert resolve_url(study.storage_url, "storage") == "postgresql://p3b:s3cr%40t@db:5432/optuna"
    assert resolve_url(study.tracking_uri, "tracking.uri") == "postgresql://mlflow:an0ther@db:5432/mlflow"
