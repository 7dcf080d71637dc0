"""Shared test setup: the repository root on sys.path, fp32 without TF32 for every test."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def fp32_exact():
    """The quantized path is specified in fp32 without TF32 (spec §8)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# The slowest test files on the 2-core VM (pytest --durations=0, 2026-12-05), longest first. scripts/test.sh
# runs two pytest-xdist workers with --dist loadfile --no-loadscope-reorder: each worker takes the next
# whole file in collection order when it is nearly done, so starting with the longest files keeps the
# two workers' finishing times close (longest processing time first; by test count, xdist's default
# order, the two longest files came last and one worker idled for about 40 s). Only the order of
# files changes; within a file, and among the other files, it stays as collected.
LONGEST_FIRST = ("test_results.py", "test_gpu_check.py", "test_reliability.py", "test_pipeline.py",
                 "test_distributed.py", "test_model_zoo.py", "test_static.py", "test_norms.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
