"""The notebook contract (DESIGN.md section 3) and the registry, checked over every notebook."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import pytest

from alignlab import cli, papers

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*/*.ipynb"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


def test_registry_matches_notebooks():
    on_disk = {p.stem: p.parent.name for p in NOTEBOOKS}
    for slug, family in on_disk.items():
        assert slug in papers.PAPERS, f"notebook {slug} has no registry entry"
        p = papers.PAPERS[slug]
        assert p.family == family, f"{slug} is in notebooks/{family} but registered as {p.family}"
        assert p.status == "reproduced", f"{slug} has a notebook but status {p.status!r}"
    for p in papers.PAPERS.values():
        if p.status == "reproduced":
            assert p.slug in on_disk, f"{p.slug} is marked reproduced but {p.notebook} is missing"
        assert p.family in papers.FAMILIES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_outputs_committed(path):
    nb = load(path)
    for c in code_cells(nb):
        assert not c.get("outputs") and c.get("execution_count") is None, f"{path.name}: strip outputs"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state is committed"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell(path):
    nb = load(path)
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    assert tagged[0]["cell_type"] == "code"
    tree = ast.parse(source(tagged[0]))
    values = {}
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, f"{path.name}: only assignments"
        values[stmt.targets[0].id] = ast.literal_eval(stmt.value)  # literals only (papermill can override)
    assert values.get("scale") == "quick" and values.get("seed") == 0 and values.get("device") == "auto"
    # papermill's parser must understand every line (it chokes on '=' inside comments)
    import papermill as pm

    assert set(pm.inspect_notebook(str(path))) == set(values)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_structure(path):
    nb = load(path)
    slug = path.stem
    paper = papers.PAPERS[slug]
    first = nb["cells"][0]
    title = source(first)
    assert first["cell_type"] == "markdown" and title.startswith("# "), f"{slug}: title cell first"
    if paper.arxiv:
        assert f"arxiv.org/abs/{paper.arxiv}" in title, f"{slug}: the title cell must link the paper"
    assert re.search(r"Runtime:\*{0,2}\s*quick", title), f"{slug}: state the measured quick runtime"
    code = "\n".join(source(c) for c in code_cells(nb))
    assert re.search(rf'alignlab\.start\(\s*"{slug}"', code), f"{slug}: open the run with alignlab.start"
    assert "run.claim(" in code and "run.finish()" in code, f"{slug}: claims and run.finish()"
    assert "run.save_figure(" in code and ", data=" in code, f"{slug}: save figures with their numbers"
    assert "alignlab.widgets.explore(" in code, f"{slug}: an interactive cell with a static twin"
    assert "show_source(" in code, f"{slug}: show the package source of the method"
    md = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "$" in md, f"{slug}: the equations belong in the markdown"
    assert "## Going further" in md, f"{slug}: exercises for a course"
    main_fig = paper.main_figure
    assert main_fig and f'"{main_fig}"' in code, f"{slug}: the gallery figure {main_fig!r} is saved"


def test_readme_gallery_is_current(monkeypatch):
    monkeypatch.setenv("ALIGNLAB_FIGURES", str(ROOT / "figures"))  # the committed runs, not this session's
    readme = (ROOT / "README.md").read_text()
    assert cli.render_readme(readme) == readme, "run `alignlab report` to rebuild the README gallery"
    for slug in papers.PAPERS:
        assert f"`{slug}`" in readme


def test_readme_and_ci_use_the_same_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for text in (readme, ci):  # the same install: torch pinned first, then the package with its dev extra
        assert re.search(r"pip install (-q )?torch==2\.13\.0", text)
        assert re.search(r'pip install (-q )?-e "\.\[dev\]"', text)
    assert re.search(r"^\s*pytest\s*$", readme, re.M), "README shows the test command"
    assert re.search(r"(^|\s)pytest(\s|$)", ci), ".ci/run calls pytest"


def test_environment_yml_matches_pyproject():
    """conda cannot be installed here, so this keeps environment.yml honest: python 3.11 and the package."""
    env = (ROOT / "environment.yml").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "python=3.11" in env
    assert "-e .[dev]" in env or '-e ".[dev]"' in env
    assert "torch==2.13.0" in env or "pytorch" in env
    names = [re.split(r"[<>=!\[ ;]", d)[0].lower() for d in project["dependencies"]]
    assert "torch" in names and "diffusers" in names
