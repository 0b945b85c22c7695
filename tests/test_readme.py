"""The README's paper-row table is scripts/report.py's output, never a hand-edited copy.

The markers and the block update live in powergrad.tables (report.py uses them from there).
"""

from pathlib import Path

from powergrad.tables import README_END, README_START, update_readme_block

ROOT = Path(__file__).resolve().parents[1]


def test_readme_block_matches_generated_rows():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(README_START)[1].split(README_END)[0]
    assert block.strip() == (ROOT / "results" / "README_rows.md").read_text().strip()


def test_update_readme_block_replaces_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\noutro\n")
    assert update_readme_block(readme, "new table")
    assert readme.read_text() == f"intro\n{README_START}\nnew table\n{README_END}\noutro\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme_block(plain, "x")
    assert plain.read_text() == "no markers\n"
