"""The documentation that is generated from code must match the code."""

from __future__ import annotations

from testbed.config.schema_docs import markdown
from tests.conftest import REPO


def test_configuration_reference_is_current() -> None:
    written = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written.strip() == markdown().strip(), "regenerate with: testbed schema --markdown > docs/configuration.md"
