"""The README's paper-row table is scripts/report.py's output, never a hand-edited copy."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_block_matches_generated_rows():
    report = _report()
    readme = (ROOT / "README.md").read_text()
    block = readme.split(report.README_START)[1].split(report.README_END)[0]
    assert block.strip() == (ROOT / "results" / "README_rows.md").read_text().strip()


def test_update_readme_block_replaces_only_between_markers(tmp_path):
    report = _report()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\noutro\n")
    assert report.update_readme_block(readme, "new table")
    assert (
        readme.read_text()
        == f"intro\n{report.README_START}\nnew table\n{report.README_END}\noutro\n"
    )
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not report.update_readme_block(plain, "x")
    assert plain.read_text() == "no markers\n"
