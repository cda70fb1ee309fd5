"""What an imported QA trace file may be: the zip read safely, and ``trace.json``'s format (the file side of
``trace_import.py``).

``open_zip(path)`` checks the file and its directory before anything is unpacked and gives an ``Archive``
whose ``read`` unpacks one member within its limit and the import's total. Refused, with a sentence that
says why and what to do (``TraceRejected``): not a zip, damaged or cut short, zip64, too many members, a
member that escapes its folder, is a link, is encrypted or uses another compression, a member or the whole
over its declared size limit (a zip bomb), a member that unpacks to more than it declared. Nothing here
writes a member to disk (``trace_import`` copies only the media whose names match the export's own pattern).

``parse_trace`` checks ``trace.json`` (pydantic models of what ``export.py`` writes): its format and version
first, so a newer export says so rather than failing on a field it changed; fields a later export adds
within the same version are ignored.
"""

from __future__ import annotations

import contextlib
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MiB = 2**20
FORMAT = "autoglm-studio-qa-trace"
FORMAT_VERSION = 1  # the newest ``format`` version this page reads ("autoglm-studio-qa-trace/1")

# Limits of what an import may cost the server. The zip itself also passes Gradio's upload cap first
# (``layout.mount_ui``: 4 x --max-upload-mb).
MAX_ZIP_BYTES = 512 * MiB  # the file
MAX_MEMBERS = 20_000  # files in the zip (an export: a few per turn plus a heatmap per word and image)
MAX_DIRECTORY_BYTES = 8 * MiB  # its central directory, checked before zipfile parses it
MAX_MEMBER_BYTES = 64 * MiB  # one member's declared uncompressed size
MAX_TOTAL_BYTES = 1024 * MiB  # all members' declared uncompressed sizes together
MAX_READ_BYTES = 512 * MiB  # what the import reads (unpacks) in all
MAX_TRACE_BYTES = 64 * MiB  # trace.json (its parsed form takes about 4x as much memory)
MAX_TURNS = 500


class TraceRejected(Exception):
    """The file cannot be imported; the message says why and what to do."""


def size_text(n: int) -> str:
    return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:,} bytes"


def _check_end_record(fp, size: int) -> None:
    """zipfile turns the whole central directory into ZipInfo objects before anything can be counted, and a
    small file can declare millions of entries: so read the end-of-central-directory record by hand first
    (layout: signature, disk numbers, entries on this disk, entries in all (2 bytes), directory size (4))."""
    tail = min(size, 22 + 0xFFFF)
    fp.seek(size - tail)
    data = fp.read(tail)
    at = data.rfind(b"PK\x05\x06")
    if at < 0 or len(data) < at + 22:
        raise TraceRejected("This file is not a zip archive (or it was cut short): import the .zip that Build QA "
                            "trace made, downloaded in full.")
    entries, directory = struct.unpack("<HI", data[at + 10:at + 16])
    if entries == 0xFFFF or directory == 0xFFFFFFFF:
        raise TraceRejected("This is a zip64 archive (over 65,535 files or 4 GiB): a QA trace never is. Import "
                            "the .zip that Build QA trace made.")
    if entries > MAX_MEMBERS:
        raise TraceRejected(f"The zip lists {entries:,} files; a QA trace holds at most {MAX_MEMBERS:,}: this is "
                            "not a trace this page can import.")
    if directory > MAX_DIRECTORY_BYTES:
        raise TraceRejected(f"The zip's directory is {size_text(directory)} (at most "
                            f"{size_text(MAX_DIRECTORY_BYTES)}): this is not a trace this page can import.")


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name) \
            or ".." in parts:
        raise TraceRejected(f"The zip names a file outside its own folder ({name[:80]!r}): refused. A QA trace "
                            "never does; import the .zip that Build QA trace made.")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise TraceRejected(f"The zip holds a link ({name[:80]!r}): refused. Import the .zip that Build QA trace "
                            "made.")
    if info.flag_bits & 0x1:
        raise TraceRejected(f"{name[:80]} is encrypted: a QA trace never is. Import the .zip that Build QA trace "
                            "made.")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise TraceRejected(f"{name[:80]} uses a compression the export never writes: import the .zip that Build "
                            "QA trace made.")
    if info.file_size > MAX_MEMBER_BYTES:
        raise TraceRejected(f"{name[:80]} would unpack to {size_text(info.file_size)}; the import unpacks at most "
                            f"{size_text(MAX_MEMBER_BYTES)} per file: refused (a zip bomb, or not a QA trace).")


class Archive:
    """The open zip: members by name, each read at most once within its limit and the import's total."""

    def __init__(self, zf: zipfile.ZipFile):
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise TraceRejected(f"The zip holds {len(infos):,} files; a QA trace holds at most {MAX_MEMBERS:,}.")
        self.zf, self.members, total = zf, {}, 0
        for info in infos:
            _check_member(info)
            if info.filename in self.members:
                raise TraceRejected(f"The zip holds {info.filename[:80]} twice: refused (which one is the trace?). "
                                    "Import the .zip that Build QA trace made.")
            self.members[info.filename] = info
            total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise TraceRejected(f"The zip would unpack to {size_text(total)}; the import accepts at most "
                                f"{size_text(MAX_TOTAL_BYTES)}: refused (a zip bomb, or not a QA trace).")
        self.read_bytes = 0
        self._cache: dict[str, bytes] = {}

    def read(self, name: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
        if name in self._cache:
            return self._cache[name]
        info = self.members.get(name)
        if info is None:
            raise TraceRejected(f"trace.json names {name[:80]}, which the zip does not hold: import the whole "
                                "export, unmodified.")
        if info.file_size > limit:
            raise TraceRejected(f"{name} would unpack to {size_text(info.file_size)}; the import reads at most "
                                f"{size_text(limit)} of it: refused.")
        # bounded by hand as well: zipfile stops at the declared size and checks the CRC, but the bound must
        # not rest on a header the file itself supplies
        bound, out = min(info.file_size, limit), bytearray()
        with self.zf.open(info) as f:
            while chunk := f.read(min(MiB, bound + 1 - len(out))):
                out += chunk
                if len(out) > bound:
                    raise TraceRejected(f"{name} unpacks to more than it declares: the zip is damaged or crafted; "
                                        "refused.")
        self.read_bytes += len(out)
        if self.read_bytes > MAX_READ_BYTES:
            raise TraceRejected(f"The trace's files unpack to over {size_text(MAX_READ_BYTES)}: too large to review "
                                "here.")
        self._cache[name] = bytes(out)
        return self._cache[name]


@contextlib.contextmanager
def open_zip(path: str | Path) -> Iterator[Archive]:
    """The zip at ``path`` as an ``Archive`` (open while the block runs); zipfile's and zlib's own errors
    inside the block become a ``TraceRejected`` too."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_ZIP_BYTES:
            raise TraceRejected(f"The file is {size_text(size)}; the import takes at most {size_text(MAX_ZIP_BYTES)}: "
                                "too large to review here.")
        with path.open("rb") as fp:
            _check_end_record(fp, size)
            with zipfile.ZipFile(fp) as zf:
                yield Archive(zf)
    except TraceRejected:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError,
            struct.error) as e:
        raise TraceRejected(f"The zip is damaged or incomplete ({type(e).__name__}: {str(e)[:120]}): download the "
                            "trace again and import the whole file.") from None


# ----------------------------------------------------------------------------- the format (trace.json)


class _Record(BaseModel):
    # fields a later export adds within the same format version are ignored (per-token logprobs came so)
    model_config = ConfigDict(extra="ignore")


class _Head(_Record):
    format: str


class _Alternative(_Record):
    token: str
    logprob: float
    token_id: int = -1  # not in the export (the token's text is); kept for the contract's record


class _Logprobs(_Record):
    token: str
    logprob: float
    entropy: float | None = None
    token_id: int = -1
    top: list[_Alternative] = Field(default_factory=list, max_length=64)


class _Route(_Record):
    layer: int
    experts: list[int]
    weights: list[float]


class _Focus(_Record):
    images: list[list[list[float]]] = Field(default_factory=list)
    audios: list[list[float]] = Field(default_factory=list)
    per_layer: Literal["full", "coarse", "dropped"] | None = None


class _Token(_Record):
    index: int = Field(ge=0)
    text: str
    phase: Literal["reasoning", "answer"]
    focus: _Focus = Field(default_factory=_Focus)
    routing: list[_Route] = Field(default_factory=list)
    logprobs: _Logprobs | None = None


class _Media(_Record):
    label: str
    from_turn: int = Field(ge=1)
    own: bool
    sent: bool = True
    file: str


class _Context(_Record):
    images: list[_Media] = Field(default_factory=list)
    audios: list[_Media] = Field(default_factory=list, max_length=MAX_TURNS)


class _Prompt(_Record):
    text: str = ""
    images: list[str] = Field(default_factory=list)
    audio: str | None = None
    audio_transcribed: bool = False


class _Branch(_Record):
    note: str = ""
    continued_tokens: int = Field(0, ge=0)


class TurnRecord(_Record):
    turn: int = Field(ge=1)
    version: int = Field(1, ge=1)
    versions: int = Field(1, ge=1)
    system: str = ""
    context_mode: Literal["each turn alone", "multi-turn"] = "each turn alone"
    context: _Context = Field(default_factory=_Context)
    prompt: _Prompt
    settings: dict[str, Any] = Field(default_factory=dict)
    reasoning: str = ""
    answer: str = ""
    finish_reason: str | None = None
    error: str | None = None
    notices: list[str] = Field(default_factory=list)
    stats: dict[str, Any] | None = None
    tokens: list[_Token] = Field(default_factory=list)
    routing_load: dict[str, Any] | None = None
    branch: _Branch | None = None  # a version continued from another alternative of a word


class TraceRecord(_Record):
    format: str
    exported_at: str = ""
    model: dict[str, Any] = Field(default_factory=dict)
    turns: list[TurnRecord] = Field(max_length=MAX_TURNS)


class LoadRecord(_Record):
    """The part of a routing load (``events.expert_load``) the Routing tab's figures index into."""

    model_config = ConfigDict(extra="allow")
    layers: list[int] = Field(min_length=1)
    experts: int = Field(ge=1)
    top_k: int = Field(ge=0)
    prefill: list[list[float]]
    decode: list[list[float]]
    total: list[list[float]]
    by_modality: dict[str, list[list[float]]] = Field(default_factory=dict)


def problem(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the top level"
    return f"{where}: {first['msg']}" + (f" ({len(e.errors()) - 1} more)" if len(e.errors()) > 1 else "")


def parse_trace(data: bytes) -> TraceRecord:
    """trace.json's bytes -> the validated record; the format and version are checked first, so a newer
    export says so rather than failing on a field it changed."""
    try:
        head = _Head.model_validate_json(data)
    except ValidationError as e:
        kind = e.errors()[0]["type"]
        if kind == "json_invalid":
            raise TraceRejected(f"trace.json is not valid JSON ({e.errors()[0]['msg']}): import the export "
                                "unmodified.") from None
        raise TraceRejected("trace.json names no format (a text field): it is not an AutoGLM Studio QA "
                            "trace.") from None
    found = re.fullmatch(re.escape(FORMAT) + r"/(\d{1,6})", head.format)
    if found is None:
        raise TraceRejected(f"trace.json is of format {head.format[:60]!r}, not {FORMAT}: it is not an AutoGLM "
                            "Studio QA trace.")
    version = int(found.group(1))
    if version > FORMAT_VERSION:
        raise TraceRejected(f"This trace is format {version}, written by a newer AutoGLM Studio; this page reads "
                            f"format {FORMAT_VERSION} and older: update the app to import it.")
    try:
        return TraceRecord.model_validate_json(data)
    except ValidationError as e:
        raise TraceRejected(f"trace.json does not match the QA trace format at {problem(e)}: import the export "
                            "unmodified.") from None
