"""The command line's parser for the entry points (train_*.py, eval.py, benchmarks/, scripts/gpu_check.py):
--help states each default once, and a mistyped command line gets one line, not the whole usage.

    p = cli.Parser(description=...)    # argparse.ArgumentParser with these two changes
"""
import argparse
import difflib
import re


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, once: not after a help that already says its default ("default:"),
    nor "(default: None)" or "(default: )" for an option whose help says what happens when it is not given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default == "" or "default:" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, "PROG: error: MESSAGE (see --help)", exit status 2,
    naming the closest option to a mistyped one (`--minimun` -> `--minimum`)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        hint = suggestion(message, [s for a in self._actions for s in a.option_strings])
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")


def suggestion(message, options):
    """"; did you mean --x?" for each unrecognized option in argparse's `message` that has a close match."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    close = []
    for word in re.findall(r"(?<!\S)(--?[^\s=]+)", message.split(":", 1)[1]):
        match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
        if match and match[0] not in close:
            close.append(match[0])
    return f"; did you mean {' or '.join(close)}?" if close else ""
