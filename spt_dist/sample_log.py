"""output.log_samples: each optimizer step's sample keys, one line per step, "STEP KEY KEY ...\\n".

Keys come from tar member names, i.e. from the data set, and may hold anything: a space or a newline written as
it is would split a key in two or start a line that is no step. So each key is percent-encoded (urllib.parse.quote)
for '%', whitespace, control characters and everything outside printable ASCII; an ordinary key (letters, digits,
punctuation) is written as it is. A line is ASCII and holds exactly one step; keys are separated by one space
(an empty key is the empty field between two spaces, or after the last one).

A resumed run keeps the lines of steps up to its checkpoint's, which the interrupted run wrote before it saved that
checkpoint, and drops the rest (it trains those steps again). A line that is no well-formed step line (a torn last
write, or a line whose step does not follow the one before) ends what is kept: everything from it on can only
come from the interrupted run's last moments.
"""

from __future__ import annotations

import os
import re
import string
from urllib.parse import quote, unquote

from spt_dist.atomic import write_text
from spt_dist.errors import UserError

# Printable ASCII but space and '%' stays as it is (letters, digits and "_.-~" always do).
_SAFE = "".join(c for c in string.punctuation if c != "%")
_STEP = re.compile(r"(?:0|[1-9][0-9]{0,17})\Z")  # int() of a longer one may refuse (4300 digits)
_KEY = re.compile(r"(?:[!-$&-~]|%[0-9A-Fa-f]{2})*\Z")  # printable ASCII but space and '%', or %XX


def encode_key(key: str) -> str:
    """The key as it is written: reversible (decode_key), one field of printable ASCII."""
    # surrogateescape: tarfile decodes undecodable name bytes to lone surrogates; they go back to those bytes.
    return quote(key, safe=_SAFE, encoding="utf-8", errors="surrogateescape")


def decode_key(field: str) -> str:
    return unquote(field, encoding="utf-8", errors="surrogateescape")


def format_line(step: int, keys: list[str]) -> str:
    return str(step) + "".join(" " + encode_key(k) for k in keys) + "\n"


def parse_line(line: str) -> tuple[int, list[str]] | None:
    """(step, keys) of one line without its newline; None if it is no well-formed step line."""
    step, *fields = line.split(" ")
    if not _STEP.match(step) or not all(_KEY.match(f) for f in fields):
        return None
    return int(step), [decode_key(f) for f in fields]


def _parse(text: str) -> tuple[list[tuple[int, list[str], int]], bool]:
    """The well-formed step lines at the start of `text` as (step, keys, offset just past the line), and whether
    what ends them is a complete line (one with its newline) rather than the end of the text or a torn last line.
    A line is well-formed if it ends with a newline, parses, and its step is above the one before."""
    entries: list[tuple[int, list[str], int]] = []
    pos, last = 0, 0
    while pos < len(text):
        end = text.find("\n", pos)
        if end < 0:
            return entries, False  # torn: the run was killed while writing it
        parsed = parse_line(text[pos:end])
        if parsed is None or parsed[0] <= last:
            return entries, True
        entries.append((*parsed, end + 1))
        last, pos = parsed[0], end + 1
    return entries, False


def _read(path: str) -> str:
    with open(path, "rb") as f:
        # Not ASCII can only be damage: it shows as U+FFFD, which no well-formed line holds.
        return f.read().decode("ascii", errors="replace")


def read_sample_log(path: str) -> list[tuple[int, list[str]]]:
    """[(step, keys)] of a samples file, keys decoded. A torn last line (the run was killed while writing it) is
    left out; any other malformed line is a UserError naming the file and line."""
    try:
        text = _read(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read the samples log ({e})") from None
    entries, malformed = _parse(text)
    if malformed:
        raise UserError(f"{path}:{len(entries) + 1}: not a line of a samples log ('STEP KEY ...', each step above "
                        "the one before, keys percent-encoded)")
    return [(step, keys) for step, keys, _ in entries]


class SampleLog:
    """Appends one line per optimizer step to `path`.

    `resume_step`: None starts the file afresh; a step (the checkpoint a run resumes from) keeps the well-formed
    lines of steps up to it (see the module docstring), rewriting the file atomically, and appends after them.
    """

    def __init__(self, path: str, resume_step: int | None) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept, self.last_step = "", 0
        if resume_step is not None and os.path.isfile(path):
            text = _read(path)
            entries = [e for e in _parse(text)[0] if e[0] <= resume_step]  # steps increase: a prefix
            if entries:
                self.last_step, _, end = entries[-1]
                kept = text[:end]
        write_text(path, kept)
        self._file = open(path, "a", encoding="ascii", newline="\n")

    def write(self, step: int, keys: list[str]) -> None:
        """The line of optimizer step `step` (after the last one written), flushed."""
        if step <= self.last_step:
            raise ValueError(f"{self.path}: step {step} written after step {self.last_step}")
        self._file.write(format_line(step, keys))
        self._file.flush()
        self.last_step = step

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
