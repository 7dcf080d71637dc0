"""One prepared check of everything that needs a GPU; writes OUT/gpu_check.json and OUT/gpu_check.md.

    bash scripts/gpu_check.sh [OUT] [FLAGS...]         # on a machine with a CUDA GPU (about 5-8 minutes)
    bash scripts/gpu_check.sh --device cpu --quick     # the dry run: the same plumbing on CPU, small (CI)

The shell wrapper picks the Python (lib.sh's pick_python), runs from the repository root and passes
every argument on (a bare first argument is --out).

Needs only torch and the project's files (no tensorboard, matplotlib or internet for the checks
themselves; the stage runs use what requirements.txt installs when present). Items, each with its
result and time; one that fails is reported and the others still run:

1. tests: the CUDA-relevant test files with TEST_DEVICE=cuda (dry run: collected only).
2. sparse_vs_dense: the sparse training forward against the dense (mixed) one on the device: loss,
   every gradient and buffer (equal, or the largest difference), and train-step times of both.
3. quantizer: ours and an independent transcription of the released arithmetic (a division by a
   Python-float scale), each on CPU and on the device: how many elements differ.
4. stages: the three stage scripts and eval.py with CUDA_VISIBLE_DEVICES=0 on synthetic data (and
   Fashion-MNIST when present), and resume: 2 + resume + 2 steps against 4 in one go.
5. torchrun: 2 processes with NCCL if 2 GPUs are visible (else 1), one stage-1 run.
6. speed: benchmarks/speed.py on the device (dry run: one small configuration).
"""
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from core import cli, distributed, runfolder  # noqa: E402

TEST_FILES = ["tests/test_quantize.py", "tests/test_models.py", "tests/test_execution.py", "tests/test_spec.py"]


def sh(cmd, env=None, timeout=600):
    """(return code, last lines of output) of a command run in the repository."""
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    return r.returncode, "\n".join((r.stdout + r.stderr).strip().splitlines()[-6:])


def environment(device):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": str(device), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version(), capability=list(torch.cuda.get_device_capability(device)))
        code, out = sh(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if \
            _which("nvidia-smi") else (1, "")
        info["driver"] = out.strip() if code == 0 else None
    return info


def _which(name):
    return any(os.access(os.path.join(p, name), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep))


def item_tests(device, quick):
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TEST_FILES]
    code, out = sh(args + (["--collect-only"] if device.type == "cpu" else []), env={"TEST_DEVICE": device.type})
    return {"ok": code == 0, "summary": out.splitlines()[-1] if out else ""}


def item_sparse_vs_dense(device, quick):
    from models import build_model
    depth, batch = (20, 16) if quick else (38, 128)
    torch.manual_seed(0)
    base = build_model(f"dfs_resnet{depth}").to(device)
    with torch.no_grad():
        base(torch.randn(8, 3, 32, 32, device=device))
        for e in base.gate_embeds:  # a gate whose choices vary with the input
            e.conv.weight.mul_(10)
        base.gate.proj.weight.normal_(0, 3)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    states, times = {}, {}
    for execution in ("dynamic", "mixed"):
        model = build_model(f"dfs_resnet{depth}").to(device)
        model.load_state_dict(base.state_dict())
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            logits, d = model(x, execution=execution)
            loss = torch.nn.functional.cross_entropy(logits, y) + 1e-5 * (d * model.option_costs).sum()
            loss.backward()
            return loss
        loss = step()
        states[execution] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                             {n: b.clone() for n, b in model.named_buffers()})
        times[execution] = timed(step, device, 2 if quick else 10)
    (la, ga, ba), (lb, gb, bb) = states["dynamic"], states["mixed"]
    diff = max([float((la - lb).abs())] + [float((ga[k] - gb[k]).abs().max()) for k in ga if k in gb]
               + [float((ba[k].float() - bb[k].float()).abs().max()) for k in ba])
    return {"ok": set(ga) == set(gb), "max_abs_difference": diff, "bit_for_bit": diff == 0.0,
            "train_step_ms": {k: 1000 * v for k, v in times.items()},
            "sparse_over_dense": times["dynamic"] / times["mixed"], "depth": depth, "batch": batch}


def timed(fn, device, repeats):
    """Seconds per call after one warm-up call (core.timing.milliseconds)."""
    from core.timing import milliseconds
    fn()
    return milliseconds(fn, device, repeats) / 1000


def released_quantize(x, bits, lo, hi):
    """The released arithmetic, transcribed: scale as a Python float, then divide, round, clamp."""
    scale = max((float(hi) - float(lo)) / (2.0 ** bits - 1), 1e-8)
    return ((x - float(lo)) / scale).round().clamp(0, 2.0 ** bits - 1) * scale + float(lo)


def item_quantizer(device, quick):
    from quantize import fake_quantize
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << (16 if quick else 22), generator=g)
    result = {}
    for bits in (8, 12, 16):
        lo, hi = x.min(), x.max()
        ours_cpu, ours_dev = fake_quantize(x, bits, lo, hi), fake_quantize(x.to(device), bits, lo.to(device), hi.to(device)).cpu()
        theirs_cpu, theirs_dev = released_quantize(x, bits, lo, hi), released_quantize(x.to(device), bits, lo, hi).cpu()
        result[f"{bits}-bit"] = {"ours_cpu_vs_device": int((ours_cpu != ours_dev).sum()),
                                 "released_cpu_vs_device": int((theirs_cpu != theirs_dev).sum()),
                                 "ours_vs_released_cpu": int((ours_cpu != theirs_cpu).sum()),
                                 "ours_vs_released_device": int((ours_dev != theirs_dev).sum())}
    return {"ok": all(v["ours_vs_released_cpu"] == 0 for v in result.values()), "elements": x.numel(),
            "differing_elements": result}


def item_stages(device, quick, out):
    save, env = os.path.join(out, "stages"), {"CUDA_VISIBLE_DEVICES": "0"} if device.type == "cuda" else {}
    common = ["--dataset", "synthetic", "--device", device.type, "--batch-size", "16", "--print-freq", "1"]
    steps = []

    def stage(script, arch, folder, iters, resume, *extra):
        cmd = [sys.executable, script, "train", arch, *common, "--iters", str(iters), "--eval-every", "2",
               "--save-folder", os.path.join(save, folder), *(["--resume", resume] if resume else []), *extra]
        code, tail = sh(cmd, env)
        steps.append({"command": " ".join(cmd[1:5] + [folder]), "rc": code, "tail": tail if code else ""})
        return os.path.join(save, folder, arch)
    base = stage("train_base.py", "resnet20", "backbone", 2, None)
    gate = stage("train_gate_init.py", "dfs_resnet20", "full", 2, os.path.join(base, runfolder.BEST))
    parent = os.path.join(gate, runfolder.LATEST)
    straight = stage("train_dfs.py", "dfs_resnet20", "dfs", 4, parent)
    split = stage("train_dfs.py", "dfs_resnet20", "split", 2, parent)
    stage("train_dfs.py", "dfs_resnet20", "split", 4, os.path.join(split, runfolder.LATEST))
    code, tail = sh([sys.executable, "eval.py", os.path.join(straight, runfolder.BEST), "--dataset", "synthetic",
                     "--device", device.type], env)
    steps.append({"command": "eval.py", "rc": code, "tail": tail if code else ""})
    resume = None
    if all(s["rc"] == 0 for s in steps):
        a = torch.load(os.path.join(straight, runfolder.LATEST), weights_only=True)["model"]
        b = torch.load(os.path.join(split, runfolder.LATEST), weights_only=True)["model"]
        resume = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return {"ok": all(s["rc"] == 0 for s in steps) and resume is not None, "steps": steps,
            "resume_2_plus_2_vs_4_max_abs_difference": resume}


def item_torchrun(device, quick, out):
    n = 2 if device.type == "cuda" and torch.cuda.device_count() >= 2 else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "train_base.py",
           "train", "resnet20", "--dataset", "synthetic", "--device", device.type, "--batch-size", "16", "--iters", "2",
           "--eval-every", "2", "--save-folder", os.path.join(out, "torchrun")]
    code, tail = sh(cmd, {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))} if device.type == "cuda" else {})
    return {"ok": code == 0, "processes": n, "backend": "nccl" if device.type == "cuda" else "gloo",
            "tail": tail if code else ""}


def item_speed(device, quick, out):
    path = os.path.join(out, "speed.json")
    cmd = [sys.executable, "benchmarks/speed.py", "--device", device.type, "--json", path]
    cmd += ["--depths", "20", "--batch-size", "16", "--repeats", "1", "--only", "plain eval"] if quick else \
        ["--depths", "38", "74", "--repeats", "5"]
    code, tail = sh(cmd)
    return {"ok": code == 0, "json": path if code == 0 else None, "tail": tail}


ITEMS = ("tests", "sparse_vs_dense", "quantizer", "stages", "torchrun", "speed")


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --quick: the dry run)")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--quick", action="store_true", help="the smallest sizes (the dry run)")
    p.add_argument("--only", nargs="+", metavar="ITEM", choices=ITEMS,
                   help=f"run only these items ({', '.join(ITEMS)})")
    args = p.parse_args(argv)
    if distributed.unusable(args.device):  # e.g. no GPU here: one line, exit 2, as the stages do
        p.exit(2, f"{p.prog}: error: {distributed.unusable(args.device)}; nothing to check "
                  f"(bash scripts/gpu_check.sh --device cpu --quick is the dry run)\n")
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    report = {"environment": environment(device), "quick": args.quick, "items": {}}
    items = {"tests": lambda: item_tests(device, args.quick),
             "sparse_vs_dense": lambda: item_sparse_vs_dense(device, args.quick),
             "quantizer": lambda: item_quantizer(device, args.quick),
             "stages": lambda: item_stages(device, args.quick, args.out),
             "torchrun": lambda: item_torchrun(device, args.quick, args.out),
             "speed": lambda: item_speed(device, args.quick, args.out)}
    assert tuple(items) == ITEMS
    for name, fn in items.items():
        if args.only and name not in args.only:
            continue
        t = time.time()
        try:
            result = fn()
        except Exception as e:  # one item's failure is reported; the others still run
            result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        result["seconds"] = round(time.time() - t, 1)
        report["items"][name] = result
        print(f"{name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    results = report["items"].values()
    dry = " (the dry run: the plumbing on the CPU, no GPU checked)" if device.type == "cpu" else ""
    print(f"{sum(r['ok'] for r in results)} of {len(results)} items ok on {device}{dry}; the report: "
          f"{os.path.abspath(os.path.join(args.out, 'gpu_check.md'))} (and gpu_check.json beside it)")
    return 0 if all(r["ok"] for r in results) else 1


def markdown(report):
    env = report["environment"]
    lines = ["# GPU check", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "| item | result | seconds | details |", "|---|---|---:|---|"]
    for name, r in report["items"].items():
        details = {k: v for k, v in r.items() if k not in ("ok", "seconds", "steps", "tail")}
        lines.append(f"| {name} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']} | `{json.dumps(details)[:400]}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
