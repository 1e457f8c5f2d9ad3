"""The benchmark matrix: which (context, concurrency, output length) rows to run.

The default matrix ships with the package (matrix.csv beside this file; benchmarks/matrix.csv
links to it). The command line narrows or replaces it: `--contexts 1k,16k` picks contexts by
their label in the file, a plain number (`--contexts 256,512`) is an input length in tokens,
`LABEL=TOKENS` names one; `--concurrency 1,2` and `--output-len 16` apply to every row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MATRIX = Path(__file__).with_name("matrix.csv")
_COLUMNS = ("context", "input_tokens", "concurrency", "output_tokens")


class MatrixError(ValueError):
    """A matrix file or override that cannot be run; the message names the file and line."""


@dataclass(frozen=True)
class MatrixRow:
    context: str  # the label the published table uses, e.g. "16k"
    input_tokens: int  # --random-input-len
    concurrency: int  # --num-prompts and --max-concurrency
    output_tokens: int  # --random-output-len

    @property
    def name(self) -> str:
        """File-name-safe row id, e.g. `16k-c2`."""
        return f"{self.context}-c{self.concurrency}"


def _positive_int(text: str, what: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise MatrixError(f"{where}: {what} must be an integer, got {text!r}") from None
    if value <= 0:
        raise MatrixError(f"{where}: {what} must be positive, got {value}")
    return value


def load_matrix(path: Path = DEFAULT_MATRIX) -> list[MatrixRow]:
    """Read a matrix CSV (`#` lines are comments) with the columns of matrix.csv."""
    path = Path(path)
    if not path.is_file():
        raise MatrixError(f"{path}: matrix file not found")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1)]
    body = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not body:
        raise MatrixError(f"{path}: no header and no rows")
    reader = csv.reader([line for _, line in body])
    header = [h.strip() for h in next(reader)]
    if tuple(header) != _COLUMNS:
        raise MatrixError(f"{path}:{body[0][0]}: header must be {','.join(_COLUMNS)}, got {header}")
    rows = []
    for (n, _), fields in zip(body[1:], reader):
        where = f"{path}:{n}"
        if len(fields) != len(_COLUMNS):
            raise MatrixError(f"{where}: expected {len(_COLUMNS)} fields, got {len(fields)}")
        context, *numbers = (f.strip() for f in fields)
        if not context:
            raise MatrixError(f"{where}: empty context label")
        rows.append(
            MatrixRow(context, *(_positive_int(v, c, where) for v, c in zip(numbers, _COLUMNS[1:])))
        )
    if not rows:
        raise MatrixError(f"{path}: header but no rows")
    return rows


def _int_list(text: str, what: str) -> list[int]:
    return [_positive_int(item.strip(), what, f"--{what}") for item in text.split(",") if item.strip()]


def select(
    rows: list[MatrixRow],
    contexts: str | None = None,
    concurrency: str | None = None,
    output_len: int | None = None,
) -> list[MatrixRow]:
    """Apply the command-line overrides to the file's rows (see the module docstring)."""
    out = list(rows)
    if contexts:
        known: dict[str, int] = {}
        for row in rows:
            known.setdefault(row.context, row.input_tokens)
        picked: list[tuple[str, int]] = []
        for item in (i.strip() for i in contexts.split(",")):
            if not item:
                continue
            if "=" in item:
                label, tokens = item.split("=", 1)
                picked.append((label.strip(), _positive_int(tokens, "input tokens", f"--contexts {item}")))
            elif item in known:
                picked.append((item, known[item]))
            elif item.isdigit():
                picked.append((item, _positive_int(item, "input tokens", "--contexts")))
            else:
                raise MatrixError(
                    f"--contexts: {item!r} is neither a context of the matrix "
                    f"({', '.join(known)}) nor a token count nor LABEL=TOKENS"
                )
        file_cs = sorted({r.concurrency for r in rows})
        default_out = rows[0].output_tokens
        out = []
        for label, tokens in picked:
            from_file = [r for r in rows if r.context == label and r.input_tokens == tokens]
            out += from_file or [MatrixRow(label, tokens, c, default_out) for c in file_cs]
    if concurrency:
        cs = _int_list(concurrency, "concurrency")
        seen: dict[tuple[str, int], MatrixRow] = {}
        for r in out:
            seen.setdefault((r.context, r.input_tokens), r)
        out = [
            MatrixRow(r.context, r.input_tokens, c, r.output_tokens) for r in seen.values() for c in cs
        ]
    if output_len is not None:
        if output_len <= 0:
            raise MatrixError(f"--output-len must be positive, got {output_len}")
        out = [MatrixRow(r.context, r.input_tokens, r.concurrency, output_len) for r in out]
    if not out:
        raise MatrixError("the overrides left no rows to run")
    return out
