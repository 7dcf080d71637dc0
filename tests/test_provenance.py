"""core/provenance.py: a record names the code that made it, "-dirty" when tracked code differs from
its commit (and only then), and the CPU: model name, torch's capability, VNNI and AMX."""
import subprocess

import pytest
import torch

from core import provenance


def git(repo, *cmd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *cmd], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("notes\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def head(repo):
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_a_checkout_is_dirty_when_its_tracked_code_differs_and_only_then(repo):
    commit = head(repo)
    assert provenance.code_commit(str(repo)) == commit
    (repo / "notes.md").write_text("more notes\n")  # docs and records do not count
    (repo / "new.py").write_text("y = 2\n")  # nor untracked files
    assert provenance.code_commit(str(repo)) == commit
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.code_commit(str(repo)) == commit + "-dirty"
    git(repo, "commit", "-q", "-am", "second")
    assert provenance.code_commit(str(repo)) == head(repo) != commit


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    assert provenance.code_commit(str(tmp_path)) is None


def test_this_checkouts_records_say_whether_its_code_is_committed():
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *provenance.CODE],
                            cwd=provenance.ROOT, capture_output=True, text=True)
    record = provenance.provenance()
    if status.returncode != 0:
        assert record["code_commit"] is None
    else:
        assert record["code_commit"].endswith("-dirty") == bool(status.stdout.strip())


@pytest.mark.parametrize("model,flags,vnni,amx", [
    ("AMD EPYC 7B13 64-Core Processor", "fpu sse2 avx avx2 fma", False, False),
    ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "avx2 avx512f avx512_vnni amx_tile amx_int8", True, True),
    ("12th Gen Intel(R) Core(TM) i7-12700", "avx2 avx_vnni", True, False),
])
def test_the_cpu_fields_are_read_from_cpuinfo(tmp_path, model, flags, vnni, amx):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nmodel name\t: {model}\nflags\t\t: {flags}\n")
    assert provenance.cpu(str(info)) == {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                         "vnni": vnni, "amx": amx}


def test_without_cpuinfo_the_cpu_is_named_by_the_platform(tmp_path):
    record = provenance.cpu(str(tmp_path / "missing"))
    assert record["cpu"] and record["vnni"] is False and record["amx"] is False
