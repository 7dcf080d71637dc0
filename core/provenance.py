"""What made a record: the code (git commit, "-dirty" when tracked code differs from it), the
versions, and the CPU, whose int8 units and vector width change some numbers (core/int8.py's
kernels, fp32 summation order). args.json, every checkpoint and every study record carry it."""
import functools
import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ("*.py", "*.sh", "requirements*.txt")  # what counts as code: records and docs do not


def git(*cmd, cwd=ROOT):
    """git's output in `cwd`, or None when git or the checkout is missing."""
    try:
        out = subprocess.run(["git", *cmd], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_commit(root=ROOT):
    """The checkout's commit, with "-dirty" when tracked code differs from it; None outside git."""
    commit = git("rev-parse", "HEAD", cwd=root)
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", *CODE, cwd=root):
        commit += "-dirty"
    return commit


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """(model name, set of flags) from /proc/cpuinfo; (platform's name, empty set) where it is missing."""
    name, flags = None, set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


@functools.cache
def cpu(cpuinfo="/proc/cpuinfo"):
    """{cpu, cpu_capability, vnni, amx}: the model name, torch's vector capability (e.g. AVX2,
    AVX512), and whether the CPU has int8 dot-product units: VNNI (AVX-512 or AVX) and AMX-INT8."""
    name, flags = cpu_flags(cpuinfo)
    return {"cpu": name, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), "amx": "amx_int8" in flags}


def provenance():
    """{code_commit, torch, python, cpu, cpu_capability, vnni, amx}. A resumed run's checkpoints
    carry the code and CPU of the segment that wrote them."""
    return {"code_commit": code_commit(), "torch": str(torch.__version__), "python": platform.python_version(),
            **cpu()}
