"""The prepared GPU check: its dry run on CPU exercises every item's plumbing (CI has no GPU)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_dry_run_reports_every_item(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["items"]) == ["tests", "sparse_vs_dense", "quantizer", "stages", "torchrun", "speed"]
    assert all(item["ok"] for item in report["items"].values()), report["items"]
    assert report["items"]["sparse_vs_dense"]["bit_for_bit"]  # on CPU the two forwards agree exactly
    assert report["items"]["stages"]["resume_2_plus_2_vs_4_max_abs_difference"] == 0.0
    quantizer = report["items"]["quantizer"]["differing_elements"]
    assert all(v["ours_cpu_vs_device"] == 0 and v["ours_vs_released_cpu"] == 0 for v in quantizer.values())
    md = (out / "gpu_check.md").read_text()
    assert "| sparse_vs_dense | ok |" in md and "| torch |" in md


def test_without_a_gpu_it_says_so_and_exits_0():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().startswith("no CUDA GPU on this machine")
