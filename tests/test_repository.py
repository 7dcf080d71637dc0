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
