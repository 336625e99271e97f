"""The results blocks in README/docs equal the generated files they name."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import tables


def test_repository_documents_are_in_sync() -> None:
    stale = tables.sync(check=True)
    assert stale == [], f"results blocks differ from their files (run `python -m benchmarks.tables`): {stale}"


def _tree(tmp_path: Path, doc: str, table: str = "| a |\n|---|\n| 1 |\n") -> Path:
    (tmp_path / "docs" / "results" / "x").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "x" / "table.md").write_text(table)
    (tmp_path / "README.md").write_text(doc)
    return tmp_path


def test_fill_check_and_hand_edit_detection(tmp_path: Path) -> None:
    doc = "intro\n<!-- begin results: docs/results/x/table.md -->\nold\n<!-- end results -->\nend\n"
    root = _tree(tmp_path, doc)
    assert tables.sync(check=True, root=root) == ["README.md: docs/results/x/table.md"]
    assert (root / "README.md").read_text() == doc  # --check changes nothing
    assert tables.sync(root=root) == ["README.md: docs/results/x/table.md"]
    filled = (root / "README.md").read_text()
    assert filled == "intro\n<!-- begin results: docs/results/x/table.md -->\n| a |\n|---|\n| 1 |\n<!-- end results -->\nend\n"
    assert tables.sync(check=True, root=root) == []
    (root / "README.md").write_text(filled.replace("| 1 |", "| 2 |"))  # a number typed by hand
    assert tables.sync(check=True, root=root) == ["README.md: docs/results/x/table.md"]


def test_missing_file_and_unclosed_block_are_named(tmp_path: Path) -> None:
    root = _tree(tmp_path, "<!-- begin results: docs/results/nope/table.md -->\n<!-- end results -->\n")
    with pytest.raises(FileNotFoundError, match="README.md: results block names docs/results/nope/table.md"):
        tables.sync(check=True, root=root)
    (root / "README.md").write_text("<!-- begin results: docs/results/x/table.md -->\nno end\n")
    with pytest.raises(ValueError, match="has no '<!-- end results -->'"):
        tables.sync(check=True, root=root)
