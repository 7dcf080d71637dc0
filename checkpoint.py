"""Checkpoints: one dict of tensors and plain Python data, written atomically, read with weights_only=True.

Keys: model, optimizer, step, best_acc, stage, arch, num_classes, options, args, data_state,
rng, format. Names follow the authors: SAVE_FOLDER/ARCH/checkpoint_latest.pth.tar and
model_best.pth.tar.
"""
import io
import os
import tempfile
import warnings

import torch

FORMAT = 1
REQUIRED = {"model": dict, "stage": str, "arch": str, "num_classes": int, "step": int}  # key: type


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not what was expected; one line for the user."""


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


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint of this project (weights_only=True), or raise CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's unpickler may warn about odd bytes before failing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt bytes make the unpickler raise almost anything (IndexError, KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, or not a checkpoint): {first[:200]}")
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), t) for k, t in REQUIRED.items()):
        expected = ", ".join(f"{k} ({t.__name__})" for k, t in REQUIRED.items())
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected a dict with {expected})")
    return ckpt


RELEASE_KEYS = ("model", "stage", "arch", "num_classes", "step", "best_acc", "options", "policy", "args")


def export_weights(src, dst):
    """Write the weights-only release of checkpoint `src` to `dst` (no optimizer, data or random
    state): what eval.py and --resume of the next stage need, a quarter of the size."""
    ckpt = load_checkpoint(src)
    save_checkpoint({k: ckpt[k] for k in RELEASE_KEYS if k in ckpt}, dst)
