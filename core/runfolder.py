"""Run folders: one run per folder, one writer at a time, write failures in one line.

A run folder (SAVE_FOLDER/ARCH) holds exactly one training run: checkpoint_latest.pth.tar,
model_best.pth.tar, log.jsonl, args.json (and, for a run extended past its first --iters,
args.until-ITERS.json: its settings before) and TensorBoard events. `claim` hands it to one
training process: it creates the folder and test-writes it, takes an advisory lock (flock; the
OS drops it when the process dies, so a crash never leaves the folder locked), refuses to start
a second run over an existing one unless told to overwrite it (the earlier run then moves aside to
FOLDER.replaced-TIME, never deleted), and, when a run continues, drops the log records past its
checkpoint. `writing(path)` turns an OSError into a WriteError that
names the file; the engine reports it in one line with exit status 4.
"""
import contextlib
import fcntl
import glob
import json
import os
import threading
import time

from core.checkpoint import CheckpointError, load_checkpoint
from core.errors import FolderError, WriteError

LATEST, BEST, LOG, ARGS = "checkpoint_latest.pth.tar", "model_best.pth.tar", "log.jsonl", "args.json"
TRAIN_LOG, TEXT_LOG, PLOT = "train.jsonl", "train.log", "training.png"  # per logging interval; console; plot
EVENTS = "events.out.tfevents.*"
LOCK = ".lock"
TEMPORARY = ".tmp-*"  # checkpoint.save_checkpoint's temporary files
EARLIER_ARGS = "args.until-{}.json"  # an extended run's settings up to its earlier end
REPLACED = ".replaced-"  # FOLDER.replaced-TIME: a run that --overwrite replaced, moved aside


@contextlib.contextmanager
def writing(path):
    """Report an OSError raised inside as a WriteError naming `path`."""
    try:
        yield
    except OSError as e:
        raise WriteError(path, e) from e


def append_record(folder, record, name=LOG):
    """One JSON line in a log of the run (log.jsonl: evaluations; train.jsonl: training intervals);
    WriteError names the file if it cannot be written."""
    append_text(folder, json.dumps(record), name)


def append_text(folder, line, name=TEXT_LOG):
    """One line at the end of a file of the run (train.log: the console lines, with their time)."""
    path = os.path.join(folder, name)
    with writing(path), open(path, "a") as f:
        f.write(line + "\n")


def last_checkpoint(folder):
    """The checkpoint a run in `folder` continues from (latest, else best), or None."""
    for name in (LATEST, BEST):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def holder(folder):
    """The pid holding `folder`'s lock, "unknown" if it has not written it yet, or None if free."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)  # never creates or changes a file
    except OSError:  # no lock file (no folder): nobody holds it
        return None
    try:
        return None if _try_lock(fd) else (os.read(fd, 32).decode(errors="replace").strip() or "unknown")
    finally:
        os.close(fd)  # also releases a lock taken just to look


def _try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def refuse_if_in_use(folder):
    """FolderError naming the process that holds `folder`, if one does."""
    pid = holder(folder)
    if pid is not None:
        raise FolderError(f"{folder} is in use by process {pid}, a run writing there; wait for it to "
                          f"end, or use another --save-folder")


def describe(path):
    """'stage base, iteration 4 of 6, best accuracy 81.20 %' for a checkpoint file."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        return f"a checkpoint that cannot be read: {e}"
    iters = (ckpt.get("args") or {}).get("iters", "?")
    best = ckpt.get("best_acc")
    best = f", best accuracy {best:.2f} %" if isinstance(best, float) and best > float("-inf") else ""
    return f"stage {ckpt['stage']}, iteration {ckpt['step']} of {iters}{best}"


def matching(folder, pattern):
    """Paths in `folder` whose name matches the glob `pattern`."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))


def run_files(folder):
    """The files of a run (checkpoints, log, args, TensorBoard events, stale temporary files)."""
    names = [os.path.join(folder, n) for n in (LATEST, BEST, LOG, ARGS, TRAIN_LOG, TEXT_LOG, PLOT)]
    return [p for p in names if os.path.exists(p)] + matching(folder, EARLIER_ARGS.format("*")) + \
        matching(folder, EVENTS) + matching(folder, TEMPORARY)


def truncate_log(folder, step):
    """Keep the log.jsonl and train.jsonl records up to `step` (a resumed run logs the later ones again).
    train.log, the console's text, is only appended to (a resume starts with its own line)."""
    for name in (LOG, TRAIN_LOG):
        _truncate(folder, name, step)


def _truncate(folder, name, step):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a failed write
    if keep != lines:
        tmp = os.path.join(folder, ".tmp-" + name)  # a stale one is removed by the next claim
        with writing(path):
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)


def claim(folder, *, resume=None, step=0, overwrite=False):
    """Take `folder` for a training run and return the RunFolder; FolderError if it cannot be used.

    `resume` is the checkpoint a continued run resumes from (None for a new run), `step` its
    iteration. A new run refuses a folder that holds a checkpoint unless `overwrite`. Only the process
    that writes (process 0 under torchrun) claims the folder.
    """
    same_run = resume is not None and os.path.isdir(folder) and \
        os.path.samefile(os.path.dirname(os.path.abspath(resume)), folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise FolderError(f"cannot create the run folder {folder}: {e.strerror or e}")
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise FolderError(f"cannot write in the run folder {folder}: {e.strerror or e}")
    try:
        if not _try_lock(fd):
            refuse_if_in_use(folder)  # names the holder
        if overwrite and same_run:
            raise FolderError(f"--overwrite starts a new run but --resume {resume} continues the one "
                              f"in {folder}; give one of them")
        existing = last_checkpoint(folder)
        if existing and not same_run and not overwrite:  # refused before writing anything
            raise FolderError(f"{folder} already holds a run ({describe(existing)}); continue it with "
                              f"--resume {existing}, or start over with --overwrite")
        try:  # the test write: fail now rather than at the first checkpoint, hours in
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError as e:
            raise FolderError(f"cannot write in the run folder {folder}: {e.strerror or e}")
        _settle(folder, existing, step, same_run)
    except BaseException:
        os.close(fd)
        raise
    return RunFolder(folder, fd)


def _settle(folder, existing, step, same_run):
    """Leave `folder` holding only the run about to start or continue (the lock is held). A run that
    --overwrite replaces is moved aside whole, never deleted; only the files of a run that saved no
    checkpoint (nothing to continue or evaluate) are removed."""
    if same_run:
        truncate_log(folder, step)
    elif existing:  # --overwrite: nothing of the earlier run may mix into the new one's files
        what = describe(existing)
        aside = set_aside(folder, [p for p in run_files(folder) if p not in matching(folder, TEMPORARY)])
        print(f"moved the run in {folder} ({what}) to {aside}; delete that folder when it is no longer needed")
    else:
        files = run_files(folder)
        try:
            for path in files:
                os.remove(path)
        except OSError as e:
            raise FolderError(f"cannot clear {folder}: {e.strerror or e}")
        if files:
            print(f"removed the files of a run that saved no checkpoint from {folder}")
    for path in matching(folder, TEMPORARY):  # left by a writer that was killed
        os.remove(path)


def set_aside(folder, files):
    """Move `files` (of the run in `folder`) into a new folder beside it, FOLDER.replaced-YYYYMMDD-HHMMSS
    (-2, -3, ... if that exists); returns its path. FolderError if they cannot be moved."""
    base = os.path.normpath(folder) + REPLACED + time.strftime("%Y%m%d-%H%M%S")
    aside, n = base, 1
    try:
        while True:
            try:
                os.mkdir(aside)
                break
            except FileExistsError:
                n += 1
                aside = f"{base}-{n}"
        for path in files:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
    except OSError as e:
        raise FolderError(f"cannot move the run in {folder} aside to {aside}: {e.strerror or e}; "
                          "nothing was deleted")
    return aside


class RunFolder:
    """A claimed run folder: its TensorBoard writer, and the lock until `release`."""

    def __init__(self, folder, fd):
        self.folder, self.fd, self.events = folder, fd, None

    def write_text(self, name, text):
        """Write a small file of the run (args.json)."""
        path = os.path.join(self.folder, name)
        with writing(path), open(path, "w") as f:
            f.write(text)

    def keep_args(self, iters):
        """Before an extension rewrites args.json: keep the run's settings as args.until-ITERS.json (once)."""
        path, kept = os.path.join(self.folder, ARGS), os.path.join(self.folder, EARLIER_ARGS.format(iters))
        if os.path.exists(path) and not os.path.exists(kept):
            with writing(kept):
                os.replace(path, kept)

    def summary_writer(self, purge_step=None):
        """A TensorBoard writer whose write failures are WriteErrors naming its event file."""
        self.events = Events(self.folder, purge_step)
        return self.events

    def hint(self):
        """How to go on after a write failure, from what is on disk."""
        path = last_checkpoint(self.folder)
        if path is None:
            return "no checkpoint was saved; once the cause is fixed, run the same command again"
        return (f"{path} is intact; once the cause is fixed (e.g. space freed), continue with the same "
                f"command plus --resume {path}")

    def release(self):
        """Close the TensorBoard writer and give the folder back."""
        try:
            if self.events is not None:
                self.events.close()
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            self.release()
        except WriteError as late:
            if error is None:  # else the first failure is the one to report
                late.hint = late.hint or self.hint()
                raise
        if isinstance(error, WriteError) and not error.hint:
            error.hint = self.hint()
        return False


class Events:
    """torch's SummaryWriter, its write failures turned into WriteErrors that name its file.

    TensorBoard writes from a thread and re-raises that thread's error at the next call; the
    thread's own traceback is kept off stderr while this writer is open.
    """

    def __init__(self, folder, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter
        before = set(matching(folder, EVENTS))
        self.path = os.path.join(folder, EVENTS)
        self.previous_hook = threading.excepthook
        threading.excepthook = self._quiet
        try:
            with writing(self.path):
                self.writer = SummaryWriter(folder, purge_step=purge_step)
        except WriteError:
            threading.excepthook = self.previous_hook
            raise
        new = set(matching(folder, EVENTS)) - before
        self.path = new.pop() if len(new) == 1 else self.path

    def _quiet(self, args):
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            self.previous_hook(args)

    def add_scalar(self, *args, **kwargs):
        with writing(self.path):
            self.writer.add_scalar(*args, **kwargs)

    def flush(self):
        """Write what is queued now (before a checkpoint, so the checkpoint covers it)."""
        with writing(self.path):
            self.writer.flush()

    def close(self):
        try:
            with writing(self.path):
                self.writer.close()
        finally:
            if threading.excepthook == self._quiet:
                threading.excepthook = self.previous_hook
