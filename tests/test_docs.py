"""The documentation as a user meets it: the method page covers every metric, links lead to files of
the repository, the README's Python examples run and its names exist, every metric's doc states its
formula, and every public function and class has a docstring."""

import ast
import pathlib
import re

import pytest
import torch

import chanaxis_fast as cf
from chanaxis_fast.data import load_mnist
from chanaxis_fast.metrics import available_metrics, get_metric, registry
from test_pipeline import BNNet

PACKAGE = pathlib.Path(cf.__file__).resolve().parent
ROOT = PACKAGE.parent
README = ROOT / "README.md"
METHOD = PACKAGE / "METHOD.md"
NO_TEST = "<!-- no-test -->"


def builtin_metrics():
    """The metrics the package itself registers (tests and examples may register more)."""
    names = [n for n in available_metrics() if get_metric(n).fn.__module__.startswith("chanaxis_fast.")]
    assert "input_capture" in names and len(names) >= 20  # the filter cannot silently empty the list
    return names


def python_blocks(text):
    """(code, runs) of every ```python block; runs is False when <!-- no-test --> is directly before it."""
    out = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, flags=re.S | re.M):
        out.append((m.group(1), not text[:m.start()].rstrip().endswith(NO_TEST)))
    return out


def without_code_blocks(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# ------------------------------------------------------------------ the method page

def test_method_page_names_every_registered_metric():
    text = METHOD.read_text()
    missing = [m for m in builtin_metrics() if f"`{m}`" not in text]
    assert not missing, f"chanaxis_fast/METHOD.md does not describe: {', '.join(missing)}"


@pytest.mark.parametrize("doc", [README, METHOD], ids=["README.md", "METHOD.md"])
def test_relative_links_lead_to_files_of_the_repository(doc):
    text = without_code_blocks(doc.read_text())
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    bad = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        if not path:
            if anchor not in anchors:
                bad.append(f"{link} (no such heading)")
            continue
        target = (doc.parent / path).resolve()
        if not target.is_relative_to(ROOT):
            bad.append(f"{link} (outside the repository)")
        elif not target.exists():
            bad.append(f"{link} (missing)")
    assert not bad, f"{doc.name}: broken links: {'; '.join(bad)}"


@pytest.mark.parametrize("doc", [README, METHOD], ids=["README.md", "METHOD.md"])
def test_table_rows_have_as_many_cells_as_their_header(doc):
    # an unescaped '|' inside `code` in a table row splits the cell (GitHub Markdown)
    bad, header = [], None
    for line in without_code_blocks(doc.read_text()).split("\n"):
        if not line.startswith("|"):
            header = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line))
        if header is None:
            header = cells
        elif cells != header:
            bad.append(line)
    assert not bad, f"{doc.name}: table rows with a wrong number of cells:\n" + "\n".join(bad)


def test_readme_links_to_the_method_page():
    assert "](chanaxis_fast/METHOD.md)" in README.read_text()


# ------------------------------------------------------------------ metric docs

def test_every_metric_doc_states_its_formula():
    # An equation, not a comparison: a '=' that is not part of '<=', '>=', '!=' or '=='.
    equation = re.compile(r"(?<![<>!=])=(?!=)")
    bad = [f"{n}: {get_metric(n).doc!r}" for n in builtin_metrics()
           if not equation.search(get_metric(n).doc)]
    assert not bad, "metric docs without a formula:\n" + "\n".join(bad)


def test_metric_registry_is_exported():
    assert cf.get_metric is registry.get_metric and cf.MetricSpec is registry.MetricSpec
    assert cf.parse_metric is registry.parse_metric
    assert cf.get_metric("peer_overlap").direction == -1 and cf.get_metric("l1").direction == 1


# ------------------------------------------------------------------ the README as written

def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    runnable = [code for code, runs in blocks if runs]
    assert runnable, "README.md has no Python example to run"
    monkeypatch.chdir(tmp_path)  # examples may write files (cal.pt)
    # metrics an example registers stay out of the registry the other tests see
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    torch.manual_seed(0)
    model = BNNet().eval()
    loader = torch.utils.data.DataLoader(load_mnist("train", limit=48), batch_size=16)
    namespace = {"model": model, "loader": loader, "__name__": "readme_example"}
    for k, code in enumerate(runnable):
        exec(compile(code, f"README.md python block {k + 1}", "exec"), namespace)


def test_no_test_marker_is_honoured_only_directly_before_a_block():
    text = ("```python\nrun()\n```\n\n<!-- no-test -->\n```python\nskip()\n```\n"
            "<!-- no-test -->\n\nprose\n```python\nrun_too()\n```\n")
    assert [runs for _, runs in python_blocks(text)] == [True, False, True]


def test_readme_names_exist():
    """Names the README shows in `code`: cf./chanaxis_fast. paths, calls of functions, ops or
    metrics, and class names, resolve in the package."""
    text = without_code_blocks(README.read_text())
    spans = [s.strip() for s in re.findall(r"`([^`]+)`", text)]
    bad = []
    for span in spans:
        dotted = re.match(r"(?:cf|chanaxis_fast)\.([A-Za-z_][\w.]*)", span)
        call = re.match(r"([A-Za-z_]\w*)\(", span)
        cls = re.fullmatch(r"([A-Z][a-z]\w*)(\.\w+)?", span)
        if dotted:
            obj = cf
            for part in dotted.group(1).rstrip(".").split("."):
                if not hasattr(obj, part):
                    bad.append(span)
                    break
                obj = getattr(obj, part)
        elif call:
            name = call.group(1)
            if not (hasattr(cf, name) or hasattr(cf.ops, name) or name in available_metrics()):
                bad.append(span)
        elif cls and not hasattr(cf, cls.group(1)):
            bad.append(span)
    assert not bad, f"README.md names what chanaxis_fast does not have: {bad}"


# ------------------------------------------------------------------ docstrings

# every module is checked (cli.py included)
DOCSTRING_EXEMPT = set()


def public_definitions_without_docstring(tree, prefix=""):
    missing = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                missing.append(prefix + node.name)
            if isinstance(node, ast.ClassDef):
                missing += public_definitions_without_docstring(node, f"{prefix}{node.name}.")
    return missing


def test_public_functions_and_classes_have_docstrings():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in DOCSTRING_EXEMPT:
            continue
        names = public_definitions_without_docstring(ast.parse(path.read_text()))
        missing += [f"{path.relative_to(ROOT)}: {n}" for n in names]
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)
