"""Fixtures for the integration suite: real `inferd serve` subprocesses on loopback.

- `demo_repository`: the demo models, built once per session.
- `server`: one shared server subprocess on the demo repository, for tests whose counters and
  settings do not matter.
- `start_server` / `module_server_factory`: extra servers (custom repositories, INFERD_*
  settings), stopped when the test (or module) ends.

When a test fails, the tail of the log of every server it used is added to its report.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from integration_support import SUMMARY_KEY, ServerFactory, ServerProcess

from inferd.demo_models import build_demo_repository
from inferd_client import InferClient

# --- fixtures ---------------------------------------------------------------------------------


def _close(factory: ServerFactory) -> None:
    """Stop the factory's servers; one that does not drain and exit 0 on SIGTERM is reported
    as a warning (the tests that pin shutdown behaviour are in test_shutdown.py)."""
    for stopped, rc in factory.close():
        warnings.warn(f"server exited with {rc} on SIGTERM\n{stopped.describe()}", stacklevel=1)


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("demo_repository")
    build_demo_repository(repo)
    return repo


@pytest.fixture(scope="session")
def server(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The shared server: demo models, default settings. Do not rely on its counters."""
    factory = ServerFactory(tmp_path_factory.mktemp("session_server"))
    try:
        yield factory(demo_repository)
    finally:
        _close(factory)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[InferClient]:
    """A blocking client of the shared server."""
    with InferClient(server.target) as c:
        yield c


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """`start_server(repository, env={...})` -> ServerProcess, stopped after the test."""
    factory = ServerFactory(tmp_path / "servers")
    try:
        yield factory
    finally:
        _close(factory)


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like start_server, for servers a whole module shares."""
    factory = ServerFactory(tmp_path_factory.mktemp("module_servers"))
    try:
        yield factory
    finally:
        _close(factory)


# --- reporting --------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(SUMMARY_KEY, [])
    if lines:
        terminalreporter.section("inferd integration figures")
        for line in lines:
            terminalreporter.write_line(line)


def _servers_of(item: pytest.Item) -> list[ServerProcess]:
    found: list[ServerProcess] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ServerProcess):
            found.append(value)
        elif isinstance(value, ServerFactory):
            found.extend(value.servers)
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report carries the log tail of every server it used."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        for server in _servers_of(item):
            report.sections.append((f"inferd server log {server.target}", server.describe()))
    return report
