"""CoNaLa-style mining (alignlab.cross_modal.mining): stdlib pairs, candidate spans, IBM Model 1 against a
hand-computed EM step and brute-force alignment sums, span scores against whole-snippet scores, PR metrics
against sklearn."""
import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve

from alignlab.cross_modal import mining as M


@pytest.fixture(scope="module")
def pairs():
    return M.stdlib_pairs()


@pytest.fixture(scope="module")
def world(pairs):
    pages, corpus = M.make_pages(pairs, n_pages=40, seed=3)
    table = M.candidate_table(pages)
    return pages, corpus, table


# ----------------------------------------------------------------------------- data

def test_stdlib_pairs_have_no_docstring_and_no_name(pairs):
    assert len(pairs) > 400 and {p.family for p in pairs} == {"text", "system"}
    for p in pairs:
        short = p.name.rsplit(".", 1)[-1]
        assert p.code.startswith(f"def {M.PLACEHOLDER}(") or p.code.startswith(f"async def {M.PLACEHOLDER}(")
        assert not re.search(rf"(?<![A-Za-z0-9_]){re.escape(short)}(?![A-Za-z0-9_])", p.code), p.name
        assert not re.search(rf"(?<![A-Za-z0-9_]){re.escape(short)}(?![A-Za-z0-9_])", p.intent), p.name
        assert '"""' not in p.code and "#" not in p.code.split("'")[0]
        assert 3 <= p.code.count("\n") + 1 <= 16
    assert M.stdlib_pairs() == pairs   # deterministic


def test_strip_function_removes_docstring_decorators_and_renames_recursion():
    src = '''
@cache
def fact(n):
    """Return n factorial."""
    # a comment
    return 1 if n < 2 else n * fact(n - 1)
'''
    assert M.strip_function(src, "fact") == "def solution(n):\n    return 1 if n < 2 else n * solution(n - 1)"
    assert M.strip_function('def f():\n    """only a docstring"""', "f") is None
    assert M.clean_intent("Return fact() of n. More text.", "fact") == "Return of n."
    assert M.first_sentence("Split the string\n   into words, e.g. a b.  Then more.") == \
        "Split the string into words, e.g. a b."


def test_tokens_split_identifiers():
    assert M.tokens("getCloseMatches(word_list, HTTPServer2)") == ["get", "close", "matches", "word", "list",
                                                                   "http", "server", "2"]


def test_candidate_spans_keep_only_parseable_unique_spans():
    block = ["import os", "def solution(x):", "    if x:", "        return os.sep", "print(solution(1))"]
    spans = {(a, b) for a, b, _, _ in M.candidate_spans(block)}
    assert (0, 5) in spans and (1, 4) in spans and (0, 1) in spans and (4, 5) in spans
    assert (2, 3) in spans                       # "if x:" + pass parses
    assert (3, 5) not in spans                   # dedented "return ..." then "print": inconsistent indentation
    codes = [c for _, _, c, _ in M.candidate_spans(block)]
    assert len(codes) == len(set(codes))
    assert all(b - a <= 2 for a, b, _, _ in M.candidate_spans(block, max_lines=2))


def test_pages_hold_one_aligned_snippet_and_a_disjoint_corpus(pairs, world):
    pages, corpus, table = world
    assert len(pages) == 40
    assert table.groupby("pid").label.sum().eq(1).all()
    page_codes = {normalize for normalize in (pg.gold for pg in pages)}
    assert not page_codes & {M.normalize(p.code) for p in corpus}
    assert all(sum(a.accepted for a in pg.answers) == 1 for pg in pages)
    assert set(M.STRUCTURAL) <= set(table.columns)
    gold = table[table.label == 1]
    assert gold.is_def.eq(1).all() and gold.complete_unit.eq(1).all()


# ----------------------------------------------------------------------------- IBM Model 1

TINY = [(["das", "haus"], ["the", "house"]), (["das", "buch"], ["the", "book"])]


def _t(model, e, f):
    return model.t[model.tgt[e], model.src[f]]


def test_ibm1_one_and_two_em_steps_match_the_hand_computation():
    m1 = M.IBM1(null=False).fit(TINY, iters=1)
    # counts after one E-step from uniform t: every posterior is 1/2
    assert _t(m1, "the", "das") == pytest.approx(1 / 2)
    assert _t(m1, "house", "das") == pytest.approx(1 / 4) and _t(m1, "book", "das") == pytest.approx(1 / 4)
    assert _t(m1, "the", "haus") == pytest.approx(1 / 2) and _t(m1, "house", "haus") == pytest.approx(1 / 2)
    assert _t(m1, "book", "haus") == pytest.approx(0)
    m2 = M.IBM1(null=False).fit(TINY, iters=2)
    # second step: posteriors of "house" over (das, haus) are (1/4, 1/2) normalised = (1/3, 2/3)
    assert _t(m2, "the", "das") == pytest.approx(3 / 5) and _t(m2, "house", "das") == pytest.approx(1 / 5)
    assert _t(m2, "the", "haus") == pytest.approx(3 / 7) and _t(m2, "house", "haus") == pytest.approx(4 / 7)
    assert np.allclose(m2.t.sum(0), 1)


def test_ibm1_log_prob_equals_the_sum_over_all_alignments():
    m = M.IBM1(null=True).fit(TINY + [(["ein", "buch"], ["a", "book"])], iters=3)
    src, tgt = ["das", "buch"], ["the", "book", "the"]
    f = [M.IBM1.NULL] + src
    total = 0.0
    for a in itertools.product(range(len(f)), repeat=len(tgt)):     # every alignment of every target word
        total += math.prod(_t(m, e, f[i]) for e, i in zip(tgt, a))
    assert m.log_prob(src, tgt) == pytest.approx(math.log(total / len(f) ** len(tgt)))


def test_span_scores_equal_whole_snippet_scores(world):
    pages, corpus, table = world
    model = M.fit_translation(corpus, iters=3)
    pg = pages[0]
    block = max((b for a in pg.answers for b in a.blocks), key=len)
    lines = [M.tokens(ln) for ln in block]
    spans = np.array([(a, b) for a, b, _, _ in M.candidate_spans(block)])
    got = M.span_scores(model[pg.family], M.tokens(pg.intent), lines, spans)
    intent = M.tokens(pg.intent)
    for (a, b), row in zip(spans, got):
        code = [w for ln in lines[a:b] for w in ln]
        n2c = model[pg.family].nl2code.log_prob(intent, code)
        c2n = model[pg.family].code2nl.log_prob(code, intent)
        assert row[:2] == pytest.approx([n2c, c2n], rel=1e-9, abs=1e-9)
        assert row[2:] == pytest.approx([n2c / len(code), c2n / len(intent)], rel=1e-9, abs=1e-9)


def test_correspondence_features_rank_the_aligned_function_over_the_competing_one(world):
    pages, corpus, table = world
    t = M.add_correspondence(table, pages, M.fit_translation(corpus))
    assert set(M.CORRESPONDENCE) <= set(t.columns) and np.isfinite(t[list(M.CORRESPONDENCE)].to_numpy()).all()
    defs = t[(t.is_def == 1) & (t.complete_unit == 1)]
    wins = [g.loc[g.ll_code2nl_norm.idxmax(), "label"] for _, g in defs.groupby("pid") if g.label.any()]
    assert np.mean(wins) > 0.7


# ----------------------------------------------------------------------------- metrics

def test_pr_curve_and_auc_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 200)
        s = np.round(rng.random(200) + 0.5 * y, 1)        # many ties
        p, r, t = M.pr_curve(y, s)
        sp, sr, st = precision_recall_curve(y, s)
        assert np.allclose(p[::-1], sp[:-1]) and np.allclose(r[::-1], sr[:-1]) and np.allclose(t[::-1], st)
        assert M.pr_auc(y, s) == pytest.approx(average_precision_score(y, s))
        f1 = max(f1_score(y, s >= th) for th in np.unique(s))
        assert M.best_f1(y, s)[0] == pytest.approx(f1)
    # recall over all aligned pairs, some never scored: the curve never reaches recall 1
    assert M.pr_curve([1, 0], [0.9, 0.1], n_positive=4)[1].max() == pytest.approx(0.25)


def test_precision_at_1_and_heuristics():
    t = pd.DataFrame(dict(pid=[0, 0, 1, 1, 1], label=[0, 1, 1, 0, 0], whole_block=[1, 1, 1, 1, 0],
                          accepted_ans=[1, 0, 0, 1, 1], block=[0, 0, 0, 0, 1]))
    assert M.precision_at_1(t, [0.2, 0.9, 0.1, 0.5, 0.3]) == pytest.approx(0.5)
    h = M.heuristic_prf(t, "accepted_first_block")        # keeps rows 0 and 3, both wrong
    assert h == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    h = M.heuristic_prf(t, "all_blocks")                  # 4 whole blocks, 2 aligned, 2 pages
    assert h["precision"] == pytest.approx(0.5) and h["recall"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.heuristic_prf(t, "longest")


def test_grouped_cross_validation_never_trains_on_the_test_group(world, monkeypatch):
    pages, corpus, table = world
    table = table.assign(gid=table.module.astype("category").cat.codes.astype(float))
    fits, preds = [], []
    real = M._classifier

    class Spy:
        def __init__(self, C):
            self.clf = real(C)

        def fit(self, x, y):
            fits.append(set(x[:, -1]))
            self.clf.fit(x, y)
            return self

        def predict_proba(self, x):
            preds.append(set(x[:, -1]))
            return self.clf.predict_proba(x)

    monkeypatch.setattr(M, "_classifier", Spy)
    proba = M.cross_val_proba(table, M.STRUCTURAL + ("gid",), groups=table.module, n_splits=4)
    assert len(fits) == 4 and all(not (f & p) for f, p in zip(fits, preds))
    assert set().union(*preds) == set(table.gid)
    assert proba.shape == (len(table),) and ((proba >= 0) & (proba <= 1)).all()


def test_page_styles_change_conventions_but_not_the_functions(pairs):
    base, corpus = M.make_pages(pairs, n_pages=60, seed=5)
    styles = {"text": {"p_import": 1.0, "p_usage": 0.0, "p_accepted": 1.0}}
    styled, corpus2 = M.make_pages(pairs, n_pages=60, seed=5, styles=styles)
    assert [p.name for p in corpus] == [p.name for p in corpus2]
    assert [(p.name, p.family) for p in base] == [(p.name, p.family) for p in styled]
    for pg in styled:
        gold_answer = next(a for a in pg.answers if any(pg.gold in "\n".join(b) for b in a.blocks))
        if pg.family == "text":
            assert gold_answer.accepted
            assert any(b[0].startswith("import ") and len(b) > 1 for b in gold_answer.blocks)
