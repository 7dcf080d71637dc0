"""The prepared GPU check: its dry run on CPU exercises every item's plumbing (CI has no GPU).

Each test goes through scripts/gpu_check.sh, the command a user types, so the wrapper's
argument forwarding is tested by the runs that are needed anyway.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_check_sh(*args, env=None):
    """Run `bash scripts/gpu_check.sh ARGS` with this interpreter (PYTHON, as lib.sh's pick_python takes it)."""
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.slow
def test_the_dry_run_reports_every_item(tmp_path):
    out = tmp_path / "out"
    r = gpu_check_sh("--device", "cpu", "--quick", "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["quick"] and report["environment"]["device"] == "cpu"  # every flag reached gpu_check.py
    assert list(report["items"]) == ["tests", "sparse_vs_dense", "quantizer", "stages", "torchrun", "speed"]
    assert all(item["ok"] for item in report["items"].values()), report["items"]
    assert report["items"]["sparse_vs_dense"]["bit_for_bit"]  # on CPU the two forwards agree exactly
    assert report["items"]["stages"]["resume_2_plus_2_vs_4_max_abs_difference"] == 0.0
    quantizer = report["items"]["quantizer"]["differing_elements"]
    assert all(v["ours_cpu_vs_device"] == 0 and v["ours_vs_released_cpu"] == 0 for v in quantizer.values())
    md = (out / "gpu_check.md").read_text()
    assert "| sparse_vs_dense | ok |" in md and "| torch |" in md


def test_the_dry_run_ends_saying_how_many_items_passed_and_where_the_report_is(tmp_path):
    out = tmp_path / "out"
    r = gpu_check_sh("--device", "cpu", "--quick", "--only", "quantizer", "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines[0].startswith("quantizer: ok"), r.stdout + r.stderr
    assert lines[-1] == (f"1 of 1 items ok on cpu (the dry run: the plumbing on the CPU, no GPU checked); the report: "
                         f"{out / 'gpu_check.md'} (and gpu_check.json beside it)")
    assert (out / "gpu_check.md").is_file() and (out / "gpu_check.json").is_file()


def test_the_wrapper_forwards_every_argument():
    r = gpu_check_sh("--help")  # the first argument, a flag: gpu_check.py's own help
    assert r.returncode == 0 and r.stdout.startswith("usage: gpu_check.py"), r.stdout + r.stderr
    assert all(flag in r.stdout for flag in ("--device", "--out", "--quick", "--only"))
    # A bare first argument is OUT (the older form), and the arguments after it are passed on too:
    # argparse objects to the unknown flag alone, so OUT arrived as --out OUT.
    r = gpu_check_sh("some_out", "--no-such-flag")
    assert r.returncode == 2 and r.stderr.strip().endswith("error: unrecognized arguments: --no-such-flag (see --help)"), r.stderr
    assert not os.path.exists(os.path.join(ROOT, "some_out"))


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = gpu_check_sh()  # no argument at all: the default OUT, and nothing to check here
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and not r.stdout.strip(), r.stdout + r.stderr
    assert "--device cuda is not usable here" in err[0] and "--device cpu --quick is the dry run" in err[0]
