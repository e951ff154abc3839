"""The Jobs API client's choices made before any request (no cluster needed): which address, which token, and the
exit status of each final state. tests/test_train_submit.py runs the commands against a real cluster."""

import os

import pytest

from hepml_dist.errors import UserError
from hepml_dist.launch import ray_jobs


@pytest.fixture(autouse=True)
def no_ray_variables(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_the_address_is_the_option_then_the_environment_then_the_local_default(monkeypatch):
    assert ray_jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert ray_jobs.resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")  # Ray's own precedence over RAY_ADDRESS
    assert ray_jobs.resolve_address(None) == "http://api:8265"
    assert ray_jobs.resolve_address("http://given:8265") == "http://given:8265"


def test_the_token_comes_from_the_variable_or_the_file_it_names(monkeypatch, tmp_path):
    assert ray_jobs.token_from_environment() is None
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert ray_jobs.token_from_environment() == ("from-file", f"the file {token_file} (RAY_AUTH_TOKEN_PATH)")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-variable")
    assert ray_jobs.token_from_environment() == ("from-variable", "RAY_AUTH_TOKEN")


@pytest.mark.parametrize("content, problem", [(None, "cannot read the token file"), ("\n", "the token file is empty")])
def test_an_unusable_token_file_is_named(monkeypatch, tmp_path, content, problem):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    with pytest.raises(UserError, match=f"RAY_AUTH_TOKEN_PATH={token_file}: {problem}"):
        ray_jobs.token_from_environment()


def test_an_explicit_address_is_not_overridden_by_the_environment(monkeypatch):
    """Ray's client would take $RAY_ADDRESS over the address it is given; the variables are hidden meanwhile."""
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    with ray_jobs._address_variables_unset():
        assert "RAY_ADDRESS" not in os.environ
    assert os.environ["RAY_ADDRESS"] == "http://elsewhere:8265"


@pytest.mark.parametrize("status, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 3), ("RUNNING", 4), ("PENDING", 4)])
def test_exit_status_by_final_state(status, code):
    state = ray_jobs.JobState(id="j", status=status, message="", entrypoint="", start_time=None, end_time=None,
                              metadata={}, type="SUBMISSION")
    assert ray_jobs.exit_code(state) == code
