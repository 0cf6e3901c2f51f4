"""The `alignlab` command line."""

from __future__ import annotations

import json

import nbformat
import pytest

from alignlab import cli, papers


def test_list_shows_all_papers(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for slug in papers.PAPERS:
        assert slug in out
    assert "45 papers" in out


@pytest.mark.parametrize("name, message", [
    ("apgg", "did you mean: apg_adaptive_projected_guidance"),
    ("b", "ambiguous"),
    ("zzz", "no paper matches"),
])
def test_run_rejects_bad_slugs(name, message, capsys):
    assert cli.main(["run", name]) == 2
    assert message in capsys.readouterr().err


def test_run_rejects_unknown_parameters(capsys):
    assert cli.main(["run", "apg", "-p", "not_a_knob=3"]) == 2
    err = capsys.readouterr().err
    assert "not_a_knob" in err and "guidance_scales" in err


def test_run_refuses_planned_papers(capsys):
    planned = next(p for p in papers.PAPERS.values() if p.status == "planned")
    assert cli.main(["run", planned.slug]) == 2
    assert "no notebook yet" in capsys.readouterr().err


def test_bad_scale_is_an_argparse_error():
    with pytest.raises(SystemExit):
        cli.main(["run", "apg", "--scale", "huge"])


def test_scale_is_not_a_free_parameter(capsys):
    assert cli.main(["run", "apg", "-p", "scale=paper"]) == 2
    assert "--scale" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("seed=3", ("seed", 3)),
    ("guidance_scales=[1, 5.5]", ("guidance_scales", [1, 5.5])),
    ("device=cpu", ("device", "cpu")),
    ("device='cuda'", ("device", "cuda")),
])
def test_parse_param(text, expected):
    assert cli.parse_param(text) == expected


@pytest.mark.parametrize("text", ["seed", "1x=2", "=3"])
def test_parse_param_errors(text):
    with pytest.raises(ValueError):
        cli.parse_param(text)


def test_run_executes_with_parameters(tmp_path, monkeypatch, capsys):
    """End to end through papermill: parameters are injected, the notebook runs in its folder, and the
    run.json it leaves is summarised. The registry and repository root are swapped for a fake paper."""
    fake = papers.Paper("zz_fake", "guidance", "A fake paper", 2026, None, "test", status="reproduced")
    monkeypatch.setitem(papers.PAPERS, "zz_fake", fake)
    monkeypatch.setattr(cli, "_root", lambda: tmp_path)
    monkeypatch.setenv("ALIGNLAB_FIGURES", str(tmp_path / "figs"))
    (tmp_path / "notebooks" / "guidance").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('scale = "quick"\nseed = 0\nwidth = 2')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, os, pathlib\n"
        "out = pathlib.Path(os.environ['ALIGNLAB_FIGURES']) / 'zz_fake'\n"
        "out.mkdir(parents=True)\n"
        "rec = {'duration_s': 0.5, 'claims': [{'claim': f'width {width} seed {seed} in ' + "
        "pathlib.Path.cwd().name, 'ok': True}], 'figures': []}\n"
        "(out / 'run.json').write_text(json.dumps(rec))")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / "guidance" / "zz_fake.ipynb")
    assert cli.main(["run", "zz_f", "-q", "-p", "width=7", "-p", "seed=4"]) == 0
    out = capsys.readouterr().out
    assert "[PASS] width 7 seed 4 in guidance" in out
    assert (tmp_path / "runs" / "zz_fake-quick-seed4.ipynb").exists()
    rec = json.loads((tmp_path / "figs" / "zz_fake" / "run.json").read_text())
    assert rec["claims"][0]["ok"]


def test_report_renders_every_paper():
    table = cli.gallery()
    assert table.count("\n") == len(papers.PAPERS) + 1
    with pytest.raises(ValueError):
        cli.render_readme("no markers here")
