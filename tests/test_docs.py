"""The docs hold together: a short README that reaches every page, links that resolve."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "BENCHMARKS.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page):
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    with open(os.path.join(ROOT, page)) as f:
        for line in f:
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif not fenced:
                lines.append(line)
    return lines


def anchors(page):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in prose(page):
        m = re.match(r"#+ (.*)", line)
        if m:
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


def links(page):
    return [m.group(1) for line in prose(page) for m in LINK.finditer(line)]


def test_readme_is_a_landing_page_under_12_kb():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) < 12 * 1024


def test_readme_starts_with_the_two_commands_ci_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        head = f.read(400)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "bash run/demo.sh" in head and "bash run/test.sh" in head
    assert re.search(r"^bash run/test\.sh$", ci, re.M)


def test_every_page_is_reached_from_the_readme_by_links():
    reached, todo = set(), ["README.md"]
    while todo:
        page = todo.pop()
        if page in reached or not page.endswith(".md") or not os.path.exists(os.path.join(ROOT, page)):
            continue
        reached.add(page)
        todo += [os.path.normpath(os.path.join(os.path.dirname(page), t.split("#")[0]))
                 for t in links(page) if not re.match(r"[a-z]+:|#", t)]
    assert set(PAGES) <= reached


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(ROOT, path)), f"{page}: {target}"
        if anchor and path.endswith(".md"):
            assert anchor in anchors(path), f"{page}: {target}"
