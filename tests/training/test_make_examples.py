"""The example-making script writes where the page reads its examples."""

from __future__ import annotations

from autoglm_app.config import ASSETS
from autoglm_app.ui.inputs import EXAMPLES_DIR
from training.make_examples import DEFAULT_OUT


def test_examples_are_written_where_the_page_reads_them():
    assert DEFAULT_OUT == EXAMPLES_DIR == ASSETS / "examples"
    assert (DEFAULT_OUT / "examples.json").exists()
