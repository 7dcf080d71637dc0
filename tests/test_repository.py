"""The repository stands on its own: no tracked file cites a path that a clone does not have.

The spec lives in docs/spec.md; a reference to a folder beside the repository (the team's shared
folder) or to the machine where the code was written would dangle in every clone.
"""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Spelled in pieces so that this file does not contain what it forbids.
MACHINE_PATH = "/" + "work" + "/"
FORBIDDEN = {".." + "/shared": "a folder beside the repository",
             "shared" + "/spec": "the team's copy of the spec (use docs/spec.md)",
             "spec/" + "dfs.md": "the team's copy of the spec (use docs/spec.md)",
             MACHINE_PATH: "an absolute path of the machine the code was written on"}
# Run records written by the tools keep the absolute paths of the machine that made them as
# provenance (the command line, the checkpoint evaluated); they are not references to follow.
RECORDS = re.compile(r"^results/.*\.(json|log)$")
# [text](target) and [text]: target; the target up to whitespace or the closing parenthesis.
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)|^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def tracked_text_files():
    """(path relative to ROOT, text) of every tracked file that exists and is text (no NUL byte, UTF-8)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    files = []
    for name in r.stdout.decode().split("\0"):
        path = os.path.join(ROOT, name)
        if not name or not os.path.isfile(path):
            continue  # deleted in the working tree, or a submodule
        with open(path, "rb") as f:
            raw = f.read()
        if b"\0" in raw:
            continue  # binary: checkpoints, images
        try:
            files.append((name, raw.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    assert files, "git ls-files listed no text file"
    return files


def test_no_tracked_file_cites_a_path_outside_the_repository():
    found = []
    for name, text in tracked_text_files():
        for needle, what in FORBIDDEN.items():
            if needle == MACHINE_PATH and RECORDS.match(name):
                continue
            for line_no, line in enumerate(text.splitlines(), 1):
                if needle in line:
                    found.append(f"{name}:{line_no}: {needle!r} ({what}): {line.strip()[:120]}")
    assert not found, "paths a clone does not have:\n" + "\n".join(found)


def link_targets(text):
    """The local targets of the markdown links in `text` (no URL, no bare #anchor), without #fragments."""
    for m in MARKDOWN_LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, ...; an anchor in the same file
        yield target.split("#", 1)[0]


def outside_links(name, text, root):
    """The markdown links of file `name` (relative to `root`) whose targets resolve outside `root`."""
    root = os.path.realpath(root)
    found = []
    for target in link_targets(text):
        resolved = os.path.realpath(os.path.join(root, os.path.dirname(name), target))
        if target.startswith("/") or os.path.commonpath([root, resolved]) != root:
            found.append(f"{name}: ({target}) resolves to {resolved}, outside the repository")
    return found


def test_link_targets_are_parsed():
    text = ("see [spec](docs/spec.md#4-cost) and [up](../x.md \"title\"), [web](https://a.b/c), [here](#top)\n"
            "[ref]: <../../y.md>\n")
    assert list(link_targets(text)) == ["docs/spec.md", "../x.md", "../../y.md"]


def test_a_link_outside_is_found_and_one_inside_is_not(tmp_path):
    (tmp_path / "tests").mkdir()
    assert outside_links("tests/README.md", "[spec](../docs/spec.md)", tmp_path) == []
    assert outside_links("README.md", "[spec](docs/spec.md) [t](tests/../README.md)", tmp_path) == []
    assert len(outside_links("README.md", "[spec](../elsewhere/spec.md)", tmp_path)) == 1
    assert len(outside_links("tests/README.md", "[spec](../../spec.md)", tmp_path)) == 1
    assert len(outside_links("README.md", "[spec](/etc/spec.md)", tmp_path)) == 1


def test_no_markdown_link_leads_outside_the_repository():
    found = [line for name, text in tracked_text_files() if name.endswith(".md")
             for line in outside_links(name, text, ROOT)]
    assert not found, "\n".join(found)


# ---- every relative link and #anchor of every markdown file resolves -------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def without_fences(text):
    """`text` with its fenced code blocks blanked, line for line."""
    lines, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            lines.append("")
        elif fence is not None:
            stripped = line.strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def without_code(text):
    """`text` without code: fenced blocks and inline code spans blanked (a link shown as code is not a link)."""
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", without_fences(text))


def github_slug(heading):
    """The anchor GitHub gives a heading: rendered text, lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<![\w])_+|_+(?![\w])", "", text)  # _emphasis_, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    """Every anchor of a markdown text: its headings' slugs (duplicates get -1, -2, ...) and <a name/id>."""
    found, seen = set(), {}
    for line in without_fences(text).splitlines():
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def broken_links(name, text, root):
    """The relative links of markdown file `name` (relative to `root`) whose file or #anchor does not exist."""
    from urllib.parse import unquote
    found = []
    for m in MARKDOWN_LINK.finditer(without_code(text)):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # http:, https:, mailto:, ...
        path, _, anchor = target.partition("#")
        path = unquote(path)
        full = os.path.normpath(os.path.join(root, os.path.dirname(name), path)) if path else os.path.join(root, name)
        if not os.path.exists(full):
            found.append(f"{name}: ({target}): {path} does not exist")
            continue
        if not anchor or not full.endswith(".md"):
            continue  # an anchor into code (#L10) is GitHub's line anchor, not a heading
        with open(full, encoding="utf-8") as f:
            if unquote(anchor).lower() not in anchors(f.read()):
                found.append(f"{name}: ({target}): no heading #{anchor} in {os.path.relpath(full, root)}")
    return found


def markdown_files():
    """Every markdown file of the checkout: tracked, and new ones not yet added (but not ignored ones)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
                       cwd=ROOT, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    names = sorted({n for n in r.stdout.decode().split("\0") if n and os.path.isfile(os.path.join(ROOT, n))})
    assert "README.md" in names and "tests/README.md" in names
    return names


def test_github_slugs_of_headings():
    assert github_slug("Several GPUs and machines") == "several-gpus-and-machines"
    assert github_slug("GPU check (`bash scripts/gpu_check.sh`)") == "gpu-check-bash-scriptsgpu_checksh"
    assert github_slug("Measured time (`eval.py --time`, `benchmarks/latency_table.py`)") == \
        "measured-time-evalpy---time-benchmarkslatency_tablepy"
    assert github_slug("Int8: can an 8-bit block run faster than full precision? (`python benchmarks/int8.py`)") == \
        "int8-can-an-8-bit-block-run-faster-than-full-precision-python-benchmarksint8py"
    assert github_slug("6b. What the paper reports") == "6b-what-the-paper-reports"
    assert github_slug("**Bold** and [a link](x.md)") == "bold-and-a-link"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A ###\n<a name=\"here\"></a>\n") == {"a", "a-1", "a-2", "here"}


def test_a_broken_link_or_anchor_is_found_and_good_ones_are_not(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Several GPUs (`torchrun`)\n\n## Notes\n## Notes\n")
    (tmp_path / "img.png").write_bytes(b"")
    good = ("[p](docs/page.md) [a](docs/page.md#several-gpus-torchrun) [d](docs/page.md#notes-1) [i](img.png)\n"
            "![fig](img.png) [here](#top) [web](https://example.com/x.md#nothing) [m](mailto:a@b.c)\n"
            "[ref]: docs/page.md#notes\n# Top\n`[code](missing.md)`\n```\n[fenced](missing.md)\n```\n")
    (tmp_path / "README.md").write_text(good)
    assert broken_links("README.md", good, tmp_path) == []
    assert broken_links("docs/other.md", "[up](../README.md#top) [p](page.md#page) [dir](../docs/)", tmp_path) == []
    for bad in ["[p](docs/missing.md)", "[a](docs/page.md#several-gpus)", "[d](docs/page.md#notes-2)",
                "[s](#nowhere)", "![fig](docs/img.png)", "[ref]: docs/page.md#gone", "[up](../README.md)",
                "[page](docs/page.md#Page-1)"]:
        assert len(broken_links("README.md", bad, tmp_path)) == 1, bad


def test_every_relative_link_and_anchor_of_every_markdown_file_resolves():
    names = markdown_files()
    found = []
    for name in names:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            found += broken_links(name, f.read(), ROOT)
    assert not found, "broken links:\n" + "\n".join(found)


# ---- citing the code: CITATION.cff and the README's BibTeX name the same version and commit -------

def citation_fields():
    """The top-level `key: value` lines of CITATION.cff (quotes removed)."""
    with open(os.path.join(ROOT, "CITATION.cff"), encoding="utf-8") as f:
        return {m.group(1): m.group(2).strip().strip('"') for m in re.finditer(r"^([a-z-]+):[ \t]*(\S.*)$", f.read(), re.M)}


def test_the_code_is_citable_by_version_date_and_commit():
    fields = citation_fields()
    assert re.fullmatch(r"\d{4}\.\d{1,2}\.\d{1,2}", fields.get("version", "")), fields
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", fields.get("date-released", "")), fields
    assert re.fullmatch(r"[0-9a-f]{40}", fields.get("commit", "")), fields
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    entry = readme.split("@software{", 1)[1].split("\n}", 1)[0]  # the README's BibTeX entry for the code
    assert f"version = {{{fields['version']}}}" in entry and fields["commit"] in entry
    assert f"year    = {{{fields['date-released'][:4]}}}" in entry
    if shutil.which("git") is None:
        return
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() == "true":
        return  # not a checkout, or one without the history to look the commit up in
    known = subprocess.run(["git", "cat-file", "-e", f"{fields['commit']}^{{commit}}"], cwd=ROOT, capture_output=True)
    assert known.returncode == 0, f"CITATION.cff names commit {fields['commit']}, which this repository's history lacks"
