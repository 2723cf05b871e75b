"""The docs' promises that can be checked mechanically."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_bad_input_table_cites_exists():
    """docs/troubleshooting.md names a test for each bad input it lists: each must be a test function of that file."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    table = text[text.index("## Bad inputs and what flow_trl does with them"):]
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| **", "| input"))]
    assert len(rows) >= 45 and len(cited) >= len(rows)
    missing = [f"{path}::{name}" for path, name in cited
               if not re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE)]
    assert not missing, missing
