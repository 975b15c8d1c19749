"""Session fixtures: the real Kafka and schema registry, started once on free loopback ports.

The stack comes from the project's own deploy/local/stack.sh, so the tests exercise exactly
what developers and the demo run. Set ``TEST_KAFKA_BOOTSTRAP`` and ``TEST_SCHEMA_REGISTRY_URL``
to reuse an already running stack while iterating.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.serde import ConfluentSchemaRegistry
from tests.support.stack import Stack, start_stack

if os.environ.get("TEST_COMPILED") == "1":
    # `make test-unit-compiled`: the enricher's mypyc build, before any test imports its
    # modules; a missing or stale build fails the run instead of testing the sources silently
    from libs.runtime.compiled import use_compiled

    _ROOT = Path(__file__).resolve().parents[1]
    _COMPILED = use_compiled(_ROOT, _ROOT / "build" / "mypyc" / "lib")
    if not _COMPILED.modules:
        raise pytest.UsageError(f"TEST_COMPILED=1, but {_COMPILED.describe()}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if os.environ.get("TEST_KAFKA_BOOTSTRAP"):
        yield Stack(
            Path("/nonexistent"),
            {
                "KAFKA_BOOTSTRAP_SERVERS": os.environ["TEST_KAFKA_BOOTSTRAP"],
                "SCHEMA_REGISTRY_URL": os.environ["TEST_SCHEMA_REGISTRY_URL"],
                "TOPIC_REPLICATION_FACTOR": "1",
            },
        )
        return
    s = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        s.down()


@pytest.fixture(scope="session")
def bootstrap(stack: Stack) -> str:
    return stack.bootstrap


@pytest.fixture(scope="session")
def registry_url(stack: Stack) -> str:
    return stack.registry_url


@pytest.fixture(scope="session")
def registry(registry_url: str) -> Iterator[ConfluentSchemaRegistry]:
    client = ConfluentSchemaRegistry(registry_url)
    yield client
    client.close()


@pytest.fixture
def service_env(stack: Stack) -> dict[str, str]:
    """Environment for running a service as a process against the session stack."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOPIC_", "ENRICHER_", "NOTIFIER_", "PRODUCER_"))
    }
    env.update(stack.env)
    env["METRICS_PORT"] = "0"
    env["TOPIC_PARTITIONS"] = "3"
    env["TOPIC_REPLICATION_FACTOR"] = "1"
    return env
