"""The README stays true: every setting is documented, the two commands lead."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from services.common.settings import CommonSettings, TopicSettings
from services.enricher.settings import EnricherSettings
from services.notifier.settings import NotifierSettings
from services.producer.settings import ProducerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "model",
    [CommonSettings, TopicSettings, ProducerSettings, EnricherSettings, NotifierSettings],
    ids=lambda m: m.__name__,
)
def test_every_setting_is_in_the_readme(model: type[BaseSettings]) -> None:
    prefix = str(model.model_config.get("env_prefix", ""))
    missing = [
        (prefix + n).upper()
        for n in model.model_fields
        if f"`{(prefix + n).upper()}`" not in README
    ]
    assert not missing, f"README lacks {missing}"


def test_readme_leads_with_demo_and_test() -> None:
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
