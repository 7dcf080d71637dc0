"""Checkpoints: one dict of tensors and plain Python data, written atomically, read with weights_only=True.

Keys: model, optimizer, step, best_acc, stage, arch, num_classes, options, args, data_state,
rng, format. Names follow the authors: SAVE_FOLDER/ARCH/checkpoint_latest.pth.tar and
model_best.pth.tar.
"""
import hashlib
import io
import os
import sys
import tempfile
import warnings

import torch

from core import authors
from core.errors import CheckpointError

FORMAT = 1
REQUIRED = {"model": dict, "stage": str, "arch": str, "num_classes": int, "step": int}  # key: type


def save_checkpoint(ckpt, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a torn file.

    A failed write (no space, I/O error) raises the OSError and leaves neither a temporary file nor
    a changed `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Serialise in memory first: torch.save writing to a file turns the OS's error (ENOSPC...)
    # into an opaque RuntimeError ("unexpected pos"); a plain write keeps it an OSError.
    buffer = io.BytesIO()
    torch.save(dict(ckpt, format=FORMAT), buffer)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; checkpoints travel between people
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sha256(path):
    """The SHA-256 of a file, hex (model zoo rows, assembled starts), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint of this project, or of the authors' code (converted, with one line on
    stderr saying what was imported), always with weights_only=True; else raise CheckpointError."""
    if os.path.isdir(path):
        inside = checkpoints_in(path)
        raise CheckpointError(f"{path} is a folder, not a checkpoint: " + (
            f"give one of the checkpoints in it: {', '.join(inside)}" if inside else
            "it holds no checkpoint (.pth or .pth.tar), nor does any folder in it"))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's unpickler may warn about odd bytes before failing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt bytes make the unpickler raise almost anything (IndexError, KeyError, ...)
        # Not torch's message: it ends in advice to load with weights_only=False, which must not be
        # done with a file of unknown origin.
        raise CheckpointError(f"{path} is not a checkpoint of this project or of the authors' code "
                              f"(truncated, or another kind of file: {type(e).__name__})")
    if authors.is_authors(ckpt):
        try:
            ckpt, note = authors.convert(ckpt, path)
        except (ValueError, KeyError, AttributeError, RuntimeError) as e:
            raise CheckpointError(str(e).splitlines()[0] if isinstance(e, ValueError) else
                                  f"{path} looks like the authors' checkpoint but does not fit their layout ({e})")
        if os.environ.get("RANK", "0") == "0":
            print(note, file=sys.stderr)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), t) for k, t in REQUIRED.items()):
        expected = ", ".join(f"{k} ({t.__name__})" for k, t in REQUIRED.items())
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected a dict with {expected}) "
                              f"or of the authors' code")
    return ckpt


def checkpoints_in(folder, at_most=6):
    """The checkpoint files (.pth, .pth.tar) in `folder` and in the folders in it (a save folder holds
    ARCH/checkpoint_latest.pth.tar), as paths under `folder`, sorted; beyond `at_most`, a count of the rest."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(dirs) if here == folder else []  # the folder and one level below it
        found += [os.path.join(here, f) for f in sorted(files)
                  if f.endswith((".pth", ".pth.tar")) and not f.startswith(".tmp-")]
    return found[:at_most] + ([f"and {len(found) - at_most} more"] if len(found) > at_most else [])


RELEASE_KEYS = ("model", "stage", "arch", "num_classes", "step", "best_acc", "options", "policy", "model_config", "args",
                "provenance")


def export_weights(src, dst):
    """Write the weights-only release of checkpoint `src` to `dst` (no optimizer, data or random
    state): what eval.py and --resume of the next stage need, a quarter of the size."""
    ckpt = load_checkpoint(src)
    save_checkpoint({k: ckpt[k] for k in RELEASE_KEYS if k in ckpt}, dst)
