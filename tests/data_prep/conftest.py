"""Fixtures of the data_prep suite: tiny raw sources (built once per session, read-only), small
synthetic converted datasets, and a runner for CLI calls that must end in a user error."""

import pytest
from raw_sources import Synth, make_cifar10, make_cifar100, make_stl10, write_synth

from data_prep.__main__ import main


@pytest.fixture(scope="session")
def cifar10_source(tmp_path_factory):
    return make_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100_source(tmp_path_factory):
    return make_cifar100(tmp_path_factory.mktemp("cifar100"))


@pytest.fixture(scope="session")
def stl10_source(tmp_path_factory):
    return make_stl10(tmp_path_factory.mktemp("stl10"))


@pytest.fixture(scope="session")
def shared_synth(tmp_path_factory) -> Synth:
    """For tests that only read; tests that write splits or damage files use `synth`."""
    return write_synth(tmp_path_factory.mktemp("shared-data"))


@pytest.fixture
def synth(tmp_path) -> Synth:
    return write_synth(tmp_path / "data")


@pytest.fixture
def cli_error(capsys):
    """Run `python -m data_prep ARGV` expecting a user error: exit code 2 and one stderr line
    starting with "error:". Returns that line."""

    def run(*argv):
        capsys.readouterr()  # drop what earlier steps of the test printed
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert (code, len(lines)) == (2, 1), captured.err
        assert lines[0].startswith("error: "), lines[0]
        return lines[0]

    return run
