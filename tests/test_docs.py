"""The README's generated sections are what the test matrix recorded (tests/works_table.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from tests.works_table import BEGIN, END, FILES, README, RECORD, render

ROOT = Path(__file__).resolve().parents[1]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_the_readme_shows_what_the_matrix_recorded() -> None:
    record = json.loads(RECORD.read_text())
    text = README.read_text()
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert section == render(record).strip(), "README's What works section is stale: run python -m tests.works_table"


def test_the_record_covers_todays_matrix() -> None:
    """Every zoo cell (model x mode) and every test of the feature files has an outcome: a model, mode or
    test added since the record was made fails here until ``python -m tests.works_table`` runs again."""
    from tests.test_model_zoo import MODES
    from tests.zoo import BUILDERS

    record = json.loads(RECORD.read_text())
    cases = record["cases"]
    zoo = {f"tests/test_model_zoo.py::test_trains_as_eager[{m}-{mode}]" for m in BUILDERS for mode in MODES}
    assert zoo <= set(cases), sorted(zoo - set(cases))[:5]
    recorded = {nodeid.split("::")[-1].split("[")[0] for nodeid in cases}
    for name in FILES:
        missing = _test_functions(ROOT / name) - recorded
        assert not missing, f"{name}: {sorted(missing)} have no recorded outcome"


def test_every_relative_link_in_the_docs_resolves() -> None:
    """The README and docs/*.md link to files that exist (links out of the repository, such as the
    shared design notes, are not checked), and the README links every docs page."""
    import re

    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path = (page.parent / target).resolve()
            if ROOT.resolve() in path.parents or path == ROOT.resolve():
                assert path.exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"
    readme = README.read_text()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"
