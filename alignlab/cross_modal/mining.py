r"""Mining aligned (intent, code) pairs from Q&A pages (Yin et al., MSR 2018, "CoNaLa mining"), on toy pages
built from the real Python standard library.

    pairs = mining.stdlib_pairs()                          # docstring first sentences and their functions
    pages, corpus = mining.make_pages(pairs, n_pages=300, seed=0)
    table = mining.candidate_table(pages)                  # every parseable contiguous line span of every block
    models = mining.fit_translation(corpus)                # IBM Model 1, P(code|nl) and P(nl|code), per family
    table = mining.add_correspondence(table, pages, models)
    proba = mining.cross_val_proba(table, mining.FEATURES["both"], groups=table.module)
    mining.pr_auc(table.label, proba)

Pieces, each a small function:

- `stdlib_pairs`: (intent, code) from `inspect`: intent = first sentence of the docstring with the function's name
  removed; code = the function re-printed by `ast.unparse` without docstring, decorators or comments, its name
  replaced by `solution` (so neither side can string-match the other on the name).
- `make_pages`: a synthetic "Stack Overflow page" per function: 2-3 answers with code blocks; the answer holding
  the function may wrap it with an import line / a usage line, or add a usage block; the other answers hold a
  different function (from the same module when possible) or a usage snippet. One answer is accepted.
- `candidate_spans`: every contiguous span of lines of a block that parses once dedented (a trailing `:` gets a
  `pass`), as in the official miner; `structural_features`: the paper's hand-crafted features.
- `IBM1`: IBM Model 1 lexical translation, trained by EM;
  $P(e\mid f)=\prod_{j=1}^{m}\frac{1}{l+1}\sum_{i=0}^{l} t(e_j\mid f_i)$ with $f_0$ = NULL.
  `span_scores` gives $\log P(\text{span}\mid\text{intent})$ and $\log P(\text{intent}\mid\text{span})$ for all spans of
  a block at once through prefix sums over tokens.
- `cross_val_proba` (logistic regression, grouped folds), `transfer_proba`, and the metrics `pr_curve`,
  `pr_auc` (average precision), `best_f1`, `precision_at_1`, `heuristic_prf`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PLACEHOLDER = "solution"

# Pinned module list, split into two "languages" (families) for the transfer experiment. Modules missing in a
# Python version, and functions whose source cannot be read, are skipped deterministically.
MODULES: dict[str, tuple[str, ...]] = {
    "text": ("string", "textwrap", "shlex", "html", "html.parser", "base64", "quopri", "difflib", "urllib.parse",
             "urllib.request", "email.utils", "email.header", "email.message", "email.feedparser", "mailbox", "csv",
             "json", "configparser", "pprint", "tokenize", "gettext", "locale", "mimetypes", "http.cookies",
             "http.client", "http.server", "smtplib", "poplib", "ftplib", "imaplib", "xml.dom.minidom",
             "xml.etree.ElementTree", "xml.sax.saxutils", "plistlib", "fnmatch", "glob", "optparse", "argparse",
             "reprlib", "pydoc", "doctest", "unittest.case", "webbrowser"),
    "system": ("statistics", "heapq", "bisect", "fractions", "random", "calendar", "ipaddress", "tempfile", "shutil",
               "pathlib", "zipfile", "tarfile", "gzip", "bz2", "lzma", "threading", "queue", "sched", "selectors",
               "subprocess", "platform", "sysconfig", "traceback", "warnings", "weakref", "functools", "enum",
               "dataclasses", "copy", "logging", "wave", "socket", "inspect", "asyncio.base_events", "asyncio.tasks",
               "concurrent.futures._base", "multiprocessing.pool", "importlib.metadata", "pkgutil", "trace", "pickle",
               "filecmp", "fileinput", "contextlib", "collections", "typing", "signal", "uuid", "hashlib", "hmac",
               "secrets"),
}


# ----------------------------------------------------------------------------- the pairs

@dataclass(frozen=True)
class Pair:
    module: str
    family: str
    name: str            # qualified name, e.g. "TextWrapper.wrap"
    intent: str
    code: str            # the function without docstring/comments, renamed to PLACEHOLDER
    args: tuple          # required positional parameter names (for a usage line)
    is_method: bool


class _Rename(ast.NodeTransformer):
    def __init__(self, old):
        self.old = old

    def visit_Name(self, node):
        if node.id == self.old:
            node.id = PLACEHOLDER
        return node

    def visit_Global(self, node):
        node.names = [PLACEHOLDER if n == self.old else n for n in node.names]
        return node

    visit_Nonlocal = visit_Global

    def visit_arg(self, node):
        if node.arg == self.old:
            node.arg = PLACEHOLDER
        return node

    def visit_keyword(self, node):
        self.generic_visit(node)
        if node.arg == self.old:
            node.arg = PLACEHOLDER
        return node

    def visit_Constant(self, node):
        if isinstance(node.value, str):
            node.value = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(self.old)}(?![A-Za-z0-9_])", PLACEHOLDER, node.value)
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if node.attr == self.old:
            node.attr = PLACEHOLDER
        return node


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whitespace collapsed."""
    para = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip())[0]
    para = " ".join(para.split())
    m = re.search(r"(?<=[a-z0-9\)\]'\"`])[.!?](?=\s+[A-Z(`'\"]|$)", para)
    return para[: m.start() + 1] if m else para


def clean_intent(doc: str, name: str) -> str:
    """First sentence with every occurrence of the function's name (as a word, optionally with `()`) removed."""
    s = first_sentence(doc)
    s = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(name)}(\(\))?(?![A-Za-z0-9_])", " ", s)
    return " ".join(s.split())


def strip_function(src: str, name: str) -> str | None:
    """`src` of one def re-printed without docstring, decorators, comments; name -> PLACEHOLDER. None if empty."""
    try:
        tree = ast.parse(textwrap.dedent(src))
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    fn = tree.body[0]
    fn.decorator_list = []
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body or all(isinstance(s, ast.Pass) for s in body):
        return None
    fn.body = body
    fn.name = PLACEHOLDER
    fn = _Rename(name).visit(fn)
    return ast.unparse(fn)


def _functions(mod):
    for name, obj in sorted(vars(mod).items()):
        if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
            yield name, obj, False
        elif inspect.isclass(obj) and obj.__module__ == mod.__name__:
            for k, v in sorted(vars(obj).items()):
                if inspect.isfunction(v) and not k.startswith("__"):
                    yield f"{name}.{k}", v, True


def stdlib_pairs(modules: dict[str, tuple[str, ...]] | None = None, min_lines: int = 3, max_lines: int = 16,
                 min_words: int = 3) -> list[Pair]:
    """(intent, code) pairs from pure-Python standard-library functions and methods with a docstring."""
    modules = MODULES if modules is None else modules
    out, seen = [], set()
    for family, names in modules.items():
        for m in names:
            try:
                mod = importlib.import_module(m)
            except ImportError:
                continue
            for qual, fn, is_method in _functions(mod):
                short = qual.rsplit(".", 1)[-1]
                if short.startswith("_") or not fn.__doc__:
                    continue
                try:
                    src = inspect.getsource(fn)
                except (OSError, TypeError):
                    continue
                code = strip_function(src, short)
                if code is None or not (min_lines <= code.count("\n") + 1 <= max_lines) or code in seen:
                    continue
                intent = clean_intent(fn.__doc__, short)
                if len(tokens(intent)) < min_words:
                    continue
                params = [p for p in inspect.signature(fn).parameters.values()
                          if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                args = tuple(p.name for p in params[1 if is_method else 0:])
                seen.add(code)
                out.append(Pair(m, family, qual, intent, code, args, is_method))
    return out


# ----------------------------------------------------------------------------- tokens

_TOKEN = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def tokens(text: str) -> list[str]:
    """Lower-cased word pieces: snake_case and camelCase identifiers split (`getCloseMatches` -> get close matches)."""
    return [t.lower() for t in _TOKEN.findall(text)]


# ----------------------------------------------------------------------------- pages

@dataclass
class Answer:
    blocks: list          # list of blocks, each a list of code lines
    accepted: bool = False
    rank: int = 0


@dataclass
class Page:
    pid: int
    intent: str
    module: str
    family: str
    name: str
    answers: list = field(default_factory=list)
    gold: str = ""        # normalised code of the aligned snippet


def _usage(p: Pair) -> str:
    call = f"{PLACEHOLDER}({', '.join(p.args)})"
    return f"print(obj.{call})" if p.is_method else f"print({call})"


def _import(p: Pair) -> str:
    return f"import {p.module}"


def _wrapped(p: Pair, rng, p_import: float, p_usage: float) -> list[str]:
    lines = p.code.split("\n")
    if rng.random() < p_import:
        lines = [_import(p)] + lines
    if rng.random() < p_usage:
        lines = lines + [_usage(p)]
    return lines


def make_pages(pairs: list[Pair], n_pages: int, seed: int = 0, p_import: float = 0.4, p_usage: float = 0.35,
               p_accepted: float = 0.65, styles: dict | None = None) -> tuple[list[Page], list[Pair]]:
    """Split `pairs` per family into page functions (n_pages / families of them) and the rest (the parallel corpus
    for the translation models, disjoint from every page), and build one page per page function.

    A page: the aligned answer (its block = [import line] + function + [usage line] with probabilities
    `p_import`, `p_usage`; sometimes a separate import block before it or a usage block after it), a competing
    answer with another function (same module when possible), and sometimes a third answer with a usage snippet.
    The aligned answer is the accepted one with probability `p_accepted`; answers are in random rank order.
    `styles` = {family: {"p_import": .., "p_usage": .., "p_accepted": ..}} gives a family its own page conventions
    (the same random draws are made whatever the probabilities, so the same functions become pages and the
    corpus does not change)."""
    rng = np.random.default_rng(seed)
    families = sorted({p.family for p in pairs})
    pages, corpus = [], []
    per_family = n_pages // len(families)
    for fam in families:
        st = {"p_import": p_import, "p_usage": p_usage, "p_accepted": p_accepted, **(styles or {}).get(fam, {})}
        fam_pairs = [p for p in pairs if p.family == fam]
        order = rng.permutation(len(fam_pairs))
        chosen = [fam_pairs[i] for i in order[:per_family]]
        corpus += [fam_pairs[i] for i in order[per_family:]]
        by_module: dict[str, list[Pair]] = {}
        for p in chosen:
            by_module.setdefault(p.module, []).append(p)
        for p in chosen:
            gold_blocks = []
            if rng.random() < 0.2:
                gold_blocks.append([_import(p)])
            gold_blocks.append(_wrapped(p, rng, st["p_import"], st["p_usage"]))
            if rng.random() < 0.3:
                gold_blocks.append([_usage(p)])
            answers = [Answer(gold_blocks)]
            same = [q for q in by_module[p.module] if q is not p]
            pool = same if same else [q for q in chosen if q is not p]
            other = pool[rng.integers(len(pool))]
            other_blocks = [_wrapped(other, rng, st["p_import"], st["p_usage"])]
            if rng.random() < 0.3:
                other_blocks.append([_usage(other)])
            answers.append(Answer(other_blocks))
            if rng.random() < 0.5:
                third = pool[rng.integers(len(pool))]
                answers.append(Answer([[_import(third), f"result = {_usage(third)[6:-1]}"]]))
            u, alt = rng.random(), int(rng.integers(1, len(answers)))
            acc = 0 if u < st["p_accepted"] else alt
            answers[acc].accepted = True
            perm = rng.permutation(len(answers))
            answers = [answers[i] for i in perm]
            for r, a in enumerate(answers):
                a.rank = r
            pages.append(Page(len(pages), p.intent, p.module, fam, p.name, answers, normalize(p.code)))
    return pages, corpus


# ----------------------------------------------------------------------------- candidates and structure

def normalize(code: str) -> str | None:
    """Dedent, complete a trailing `:` with `pass`, parse; the canonical `ast.unparse` text, or None."""
    code = textwrap.dedent(code).rstrip()
    if code.endswith(":"):
        code += " pass"
    try:
        return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError):
        return None


def candidate_spans(block: list[str], max_lines: int | None = None) -> list[tuple[int, int, str, ast.Module]]:
    """Every contiguous span [a, b) of lines (at most `max_lines`) that parses: (a, b, normalised code, tree).
    A span whose normalised code repeats an earlier span of the block (`x:` + `pass` vs `x:` then `pass`) is
    dropped, so each snippet is one candidate."""
    out, seen = [], set()
    n = len(block)
    for a in range(n):
        for b in range(a + 1, n + 1 if max_lines is None else min(n, a + max_lines) + 1):
            code = normalize("\n".join(block[a:b]))
            if code is not None and code not in seen:
                seen.add(code)
                out.append((a, b, code, ast.parse(code)))
    return out


def _starts_with_assign(tree) -> bool:
    for s in tree.body:
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            continue
        return isinstance(s, (ast.Assign, ast.AugAssign, ast.AnnAssign))
    return False


def _single_value(tree) -> bool:
    return len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) and \
        isinstance(tree.body[0].value, (ast.Name, ast.Constant, ast.Attribute))


LINE_BUCKETS = ("num_lines=1", "num_lines=2", "num_lines=3", "num_lines<=5", "num_lines<=10", "num_lines>10")


def _line_bucket(n: int) -> str:
    if n <= 3:
        return f"num_lines={n}"
    return "num_lines<=5" if n <= 5 else "num_lines<=10" if n <= 10 else "num_lines>10"


def structural_features(block: list[str], a: int, b: int, tree, answer: Answer, block_index: int) -> dict:
    """The hand-crafted features of the official miner (block boundaries, assignment / value / import, accepted
    answer, only snippet, answer rank, line-count buckets, their conjunctions) plus two that matter for
    multi-line code: the span ends a statement (`complete_unit`: the next line is not indented deeper than the
    span's first line) and it is one function definition (`is_def`)."""
    n = b - a
    indent = lambda s: len(s) - len(s.lstrip())
    complete = b == len(block) or indent(block[b]) <= indent(block[a])
    f = {
        "start_of_block": a == 0, "end_of_block": b == len(block), "whole_block": a == 0 and b == len(block),
        "start_with_assign": _starts_with_assign(tree), "single_value": _single_value(tree),
        "contains_import": any(isinstance(s, (ast.Import, ast.ImportFrom)) for s in tree.body),
        "accepted_ans": answer.accepted, "only_snippet": len(answer.blocks) == 1,
        "complete_unit": complete,
        "is_def": len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)),
        "first_block": block_index == 0,
        "post_rank_0": answer.rank == 0, "post_rank_1": answer.rank == 1, "post_rank_2": answer.rank >= 2,
    }
    f["accepted_ans && only_snippet && whole_block"] = f["accepted_ans"] and f["only_snippet"] and f["whole_block"]
    f["!start_with_assign && end_of_block"] = (not f["start_with_assign"]) and f["end_of_block"]
    f["!start_with_assign && num_lines=1"] = (not f["start_with_assign"]) and n == 1
    for k in LINE_BUCKETS:
        f[k] = _line_bucket(n) == k
    return f


STRUCTURAL = ("start_of_block", "end_of_block", "whole_block", "start_with_assign", "single_value",
              "contains_import", "accepted_ans", "only_snippet", "complete_unit", "is_def", "first_block",
              "post_rank_0", "post_rank_1", "post_rank_2", "accepted_ans && only_snippet && whole_block",
              "!start_with_assign && end_of_block", "!start_with_assign && num_lines=1") + LINE_BUCKETS
CORRESPONDENCE = ("ll_nl2code", "ll_code2nl", "ll_nl2code_norm", "ll_code2nl_norm", "ll_page_zscore_nl2code",
                  "ll_page_zscore_code2nl", "ll_max", "ll_min")
FEATURES = {"structural": STRUCTURAL, "correspondence": CORRESPONDENCE, "both": STRUCTURAL + CORRESPONDENCE}


def candidate_table(pages: list[Page], max_lines: int | None = None) -> pd.DataFrame:
    """One row per candidate span: page, module, family, answer, block, span, code, label, structural features.
    The label is 1 when the normalised span equals the page's aligned snippet."""
    rows = []
    for pg in pages:
        for ai, ans in enumerate(pg.answers):
            for bi, block in enumerate(ans.blocks):
                for a, b, code, tree in candidate_spans(block, max_lines):
                    rows.append(dict(pid=pg.pid, module=pg.module, family=pg.family, answer=ai, block=bi, start=a,
                                     end=b, n_lines=b - a, code=code, label=int(code == pg.gold),
                                     **structural_features(block, a, b, tree, ans, bi)))
    df = pd.DataFrame(rows)
    df[list(STRUCTURAL)] = df[list(STRUCTURAL)].astype(float)
    return df


# ----------------------------------------------------------------------------- IBM Model 1

class IBM1:
    r"""IBM Model 1: $P(e\mid f)=\prod_{j=1}^{m}\frac{1}{l+1}\sum_{i=0}^{l} t(e_j\mid f_i)$, $f_0$ = NULL (if `null`).

    EM from uniform $t$: E-step $c(e,f) \mathrel{+}= t(e\mid f)/\sum_{i} t(e\mid f_i)$ for every target token $e$ and
    source token $f$ of every pair; M-step $t(e\mid f) = c(e,f)/\sum_{e'} c(e',f)$. When scoring, a word never seen in
    training still counts in the length $l$ or $m$, and every probability is at least `floor`."""

    NULL = "<null>"

    def __init__(self, null: bool = True, floor: float = 1e-6):
        self.null, self.floor = null, floor

    def fit(self, pairs: list[tuple[list[str], list[str]]], iters: int = 5) -> "IBM1":
        """`pairs`: (source tokens, target tokens)."""
        src_vocab = sorted({w for s, _ in pairs for w in s} | ({self.NULL} if self.null else set()))
        tgt_vocab = sorted({w for _, t in pairs for w in t})
        self.src = {w: i for i, w in enumerate(src_vocab)}
        self.tgt = {w: i for i, w in enumerate(tgt_vocab)}
        enc = [(self._src_ids(s), np.array([self.tgt[w] for w in t])) for s, t in pairs]
        enc = [(s, t) for s, t in enc if len(s) and len(t)]
        self.t = np.full((len(tgt_vocab), len(src_vocab)), 1.0 / len(tgt_vocab))
        for _ in range(iters):
            counts = np.zeros_like(self.t)
            for s, t in enc:
                sub = self.t[np.ix_(t, s)]                       # (m, l+1): t(e_j | f_i)
                post = sub / sub.sum(1, keepdims=True)           # alignment posterior of e_j over the f_i
                np.add.at(counts, (t[:, None], s[None, :]), post)
            self.t = counts / np.maximum(counts.sum(0, keepdims=True), 1e-300)
            self.t[:, counts.sum(0) == 0] = 1.0 / len(tgt_vocab)
        return self

    def _src_ids(self, src):
        ids = [self.src[w] for w in src if w in self.src]
        if self.null:
            ids = [self.src[self.NULL]] + ids
        return np.array(ids, dtype=int)

    def table(self, src: list[str], tgt: list[str]) -> np.ndarray:
        """(len(tgt), len(src) [+1 NULL column first]) matrix of t(e_j | f_i); unknown source words get a column
        of `floor`, unknown target words a row of `floor`."""
        cols = [self.src.get(w, -1) for w in src]
        if self.null:
            cols = [self.src[self.NULL]] + cols
        rows = [self.tgt.get(w, -1) for w in tgt]
        out = np.full((len(rows), len(cols)), self.floor)
        r, c = np.array(rows, dtype=int), np.array(cols, dtype=int)
        ok_r, ok_c = r >= 0, c >= 0
        out[np.ix_(ok_r, ok_c)] = np.maximum(self.t[np.ix_(r[ok_r], c[ok_c])], self.floor)
        return out

    def log_prob(self, src: list[str], tgt: list[str]) -> float:
        r"""$\log P(\text{tgt}\mid\text{src}) = \sum_j \log\frac{1}{l+1}\sum_i t(e_j\mid f_i)$ (no length prior)."""
        tab = self.table(src, tgt)
        return float(np.log(tab.sum(1) / tab.shape[1]).sum())


@dataclass
class Translation:
    """The two directions: `nl2code` models P(code | intent), `code2nl` models P(intent | code)."""
    nl2code: IBM1
    code2nl: IBM1


def fit_translation(corpus: list[Pair], iters: int = 5) -> dict[str, Translation]:
    """One pair of IBM-1 models per family (a "language"), trained on that family's parallel corpus."""
    out = {}
    for fam in sorted({p.family for p in corpus}):
        data = [(tokens(p.intent), tokens(p.code)) for p in corpus if p.family == fam]
        out[fam] = Translation(IBM1().fit(data, iters), IBM1().fit([(c, n) for n, c in data], iters))
    return out


def span_scores(model: Translation, intent: list[str], lines: list[list[str]], spans: np.ndarray) -> np.ndarray:
    r"""For spans [a, b) of a block's lines (token lists per line): an (S, 4) array of
    $\log P(\text{span}\mid\text{intent})$, $\log P(\text{intent}\mid\text{span})$, and both divided by the target
    length (code tokens, intent words). Prefix sums over the block's tokens make all spans cost one pass:
    $\log P(c\mid i) = \sum_{k\in\text{span}} \log\frac{1}{m+1}\sum_j t(c_k\mid i_j)$, and
    $\log P(i\mid c) = \sum_j \log\frac{1}{L+1}\big(t(i_j\mid\text{NULL}) + \sum_{k\in\text{span}} t(i_j\mid c_k)\big)$."""
    flat = [w for ln in lines for w in ln]
    off = np.concatenate([[0], np.cumsum([len(ln) for ln in lines])])
    a, b = off[spans[:, 0]], off[spans[:, 1]]
    n_code = b - a
    # P(code | intent): per code token, log of the mean over (NULL + intent words) of t(c_k | i_j)
    tab = model.nl2code.table(intent, flat)                         # (T, m+1)
    per_tok = np.log(tab.sum(1) / tab.shape[1]) if len(flat) else np.zeros(0)
    cum = np.concatenate([[0.0], np.cumsum(per_tok)])
    ll_n2c = cum[b] - cum[a]
    # P(intent | code): per intent word, NULL term + sum over the span's code tokens
    tab = model.code2nl.table(flat, intent)                         # (m, T+1), column 0 = NULL
    cum = np.concatenate([np.zeros((len(intent), 1)), np.cumsum(tab[:, 1:], axis=1)], axis=1)
    inner = tab[:, :1] + cum[:, b] - cum[:, a]                       # (m, S)
    ll_c2n = np.log(inner / (n_code + 1)[None, :]).sum(0)
    return np.stack([ll_n2c, ll_c2n, ll_n2c / np.maximum(n_code, 1), ll_c2n / max(len(intent), 1)], 1)


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(0)
    return np.where(sd > 0, (x - x.mean(0)) / np.where(sd > 0, sd, 1), 0.0)


def add_correspondence(table: pd.DataFrame, pages: list[Page], models: dict[str, Translation]) -> pd.DataFrame:
    """Add the correspondence features of the official miner: raw and length-normalised log-probabilities in
    both directions, their z-scores over the page's candidates, and the max / min of the two raw ones."""
    table = table.copy()
    feats = np.zeros((len(table), 4))
    for (pid, ai, bi), idx in table.groupby(["pid", "answer", "block"]).indices.items():
        pg = pages[pid]
        block = pg.answers[ai].blocks[bi]
        spans = table[["start", "end"]].to_numpy()[idx]
        feats[idx] = span_scores(models[pg.family], tokens(pg.intent), [tokens(ln) for ln in block], spans)
    table["ll_nl2code"], table["ll_code2nl"], table["ll_nl2code_norm"], table["ll_code2nl_norm"] = feats.T
    z = np.zeros((len(table), 2))
    for _, idx in table.groupby("pid").indices.items():
        z[idx] = _zscore(feats[idx, :2])
    table["ll_page_zscore_nl2code"], table["ll_page_zscore_code2nl"] = z.T
    table["ll_max"], table["ll_min"] = feats[:, :2].max(1), feats[:, :2].min(1)
    return table


# ----------------------------------------------------------------------------- the classifier

def _classifier(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))


def cross_val_proba(table: pd.DataFrame, features, groups, n_splits: int = 5, C: float = 0.1) -> np.ndarray:
    """Out-of-fold P(aligned) from a logistic regression on `features`, folds grouped by `groups` (a module or a
    page never has candidates on both sides of a split)."""
    from sklearn.model_selection import GroupKFold

    x, y = table[list(features)].to_numpy(float), table["label"].to_numpy()
    out = np.zeros(len(table))
    for tr, te in GroupKFold(n_splits=n_splits).split(x, y, np.asarray(groups)):
        out[te] = _classifier(C).fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
    return out


def transfer_proba(train: pd.DataFrame, test: pd.DataFrame, features, C: float = 0.1) -> np.ndarray:
    """Train on all of `train` (one "language"), score every candidate of `test` (the other)."""
    clf = _classifier(C).fit(train[list(features)].to_numpy(float), train["label"].to_numpy())
    return clf.predict_proba(test[list(features)].to_numpy(float))[:, 1]


# ----------------------------------------------------------------------------- metrics

def pr_curve(y, score, n_positive: int | None = None):
    """Precision and recall at every distinct threshold, highest score first (ties enter together), as
    `sklearn.metrics.precision_recall_curve` but in increasing-recall order without its final (1, 0) point.
    `n_positive` (default: sum of y) is the recall denominator, e.g. all aligned pairs of the pages even if a
    method never scores some of them. Returns (precision, recall, thresholds)."""
    y, s = np.asarray(y, float), np.asarray(score, float)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]      # last index of each run of tied scores
    tp = np.cumsum(y)[last]
    n_pos = y.sum() if n_positive is None else n_positive
    return tp / (last + 1), tp / max(n_pos, 1e-12), s[last]


def pr_auc(y, score, n_positive: int | None = None) -> float:
    r"""Area under the PR curve as average precision, $\sum_k (R_k - R_{k-1}) P_k$ (sklearn's
    `average_precision_score`)."""
    p, r, _ = pr_curve(y, score, n_positive)
    return float(np.sum(np.diff(np.r_[0.0, r]) * p))


def best_f1(y, score, n_positive: int | None = None) -> tuple[float, float]:
    """The best F1 over thresholds and the threshold reaching it."""
    p, r, t = pr_curve(y, score, n_positive)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    k = int(np.argmax(f))
    return float(f[k]), float(t[k])


def precision_at_1(table: pd.DataFrame, score) -> float:
    """Fraction of pages whose top-scoring candidate is the aligned snippet (ties broken by table order)."""
    s = pd.Series(np.asarray(score, float), index=table.index)
    top = s.groupby(table["pid"]).idxmax()
    return float(table.loc[top.values, "label"].mean())


def heuristic_prf(table: pd.DataFrame, kind: str = "accepted_first_block") -> dict:
    """Precision, recall and F1 of a fixed rule that keeps some whole blocks: `accepted_first_block` (the title
    paired with the first code block of the accepted answer, the paper's baseline), `all_blocks` (every block)."""
    whole = table["whole_block"] > 0
    if kind == "accepted_first_block":
        keep = whole & (table["accepted_ans"] > 0) & (table["block"] == 0)
    elif kind == "all_blocks":
        keep = whole
    else:
        raise ValueError(f"unknown heuristic {kind!r}; valid: accepted_first_block, all_blocks")
    n_pages = table["pid"].nunique()
    tp = float(table.loc[keep, "label"].sum())
    p, r = tp / max(int(keep.sum()), 1), tp / n_pages
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
