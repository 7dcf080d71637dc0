"""The project's errors: one hierarchy, each class carrying the exit status its command returns.

Every entry point catches `DFSError`, prints its one-line message and returns `status`:

    DFSError                       status 2
    ├── UserError                  2  the user's input (flags, a run to continue, a policy...)
    ├── CheckpointError            2  a checkpoint missing, unreadable or not what was expected
    ├── DatasetError               2  a dataset that cannot be found or read (data.py)
    ├── FolderError                2  a run folder that cannot be used (runfolder.py)
    ├── TrainingError              3  training cannot go on (non-finite loss)
    └── WriteError                 4  a write failed mid-run (no space, I/O error, permission)

Each class is also importable from the module that raises it (settings.UserError,
checkpoint.CheckpointError, data.DatasetError, runfolder.FolderError and WriteError,
engine.TrainingError).
"""


class DFSError(Exception):
    """A failure reported to the user in one line; `status` is the command's exit status."""
    status = 2


class UserError(DFSError):
    """A problem with the user's input, reported in one line with exit status 2."""


class CheckpointError(DFSError):
    """A checkpoint that is missing, unreadable or not what was expected; one line for the user."""


class DatasetError(DFSError):
    """A dataset that cannot be found or read; its message is one line for the user."""


class FolderError(DFSError):
    """The run folder cannot be used (in use, holds another run, not writable); exit status 2."""


class TrainingError(DFSError):
    """Training cannot go on (non-finite loss); exit status 3."""
    status = 3


class WriteError(DFSError):
    """A write failed mid-run (no space, I/O error, permission); exit status 4."""
    status = 4

    def __init__(self, path, error, hint=""):
        super().__init__(path, error)
        self.path, self.error, self.hint = path, error, hint

    def __str__(self):
        reason = self.error.strerror or str(self.error) or type(self.error).__name__
        return f"cannot write {self.path}: {reason}" + (f"; {self.hint}" if self.hint else "")


def value_error(parser, message):
    """A value the command cannot use, though its syntax parsed: one line and exit status 2, as core/cli.py's
    Parser reports a syntax error."""
    parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
