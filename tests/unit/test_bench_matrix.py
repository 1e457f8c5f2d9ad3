"""The matrix file and its command-line overrides."""

from __future__ import annotations

import pytest

from vllm_ampere.bench.matrix import DEFAULT_MATRIX, MatrixError, MatrixRow, load_matrix, select


def test_default_matrix_is_the_issue_matrix():
    rows = load_matrix()
    assert [r.context for r in rows[::3]] == ["1k", "16k", "32k", "64k", "200k"]
    assert {(r.context, r.concurrency) for r in rows} == {
        (c, n) for c in ("1k", "16k", "32k", "64k", "200k") for n in (1, 2, 4)
    }
    assert {r.output_tokens for r in rows} == {512}
    tokens = {r.context: r.input_tokens for r in rows}
    # The published rows' input lengths (seed card): 1k = 1,000; 2^k Ki - 512 after that.
    assert tokens == {"1k": 1000, "16k": 15872, "32k": 32256, "64k": 65024, "200k": 199488}
    assert DEFAULT_MATRIX.parent.name == "bench"  # shipped as package data


def test_benchmarks_folder_links_to_the_packaged_files():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in ("matrix.csv", "seed_matrix.csv"):
        assert (root / "benchmarks" / name).resolve() == (DEFAULT_MATRIX.parent / name).resolve()


def test_overrides_small_matrix():
    rows = select(load_matrix(), contexts="256,512", concurrency="1,2", output_len=16)
    assert rows == [
        MatrixRow("256", 256, 1, 16), MatrixRow("256", 256, 2, 16),
        MatrixRow("512", 512, 1, 16), MatrixRow("512", 512, 2, 16),
    ]  # fmt: skip


def test_overrides_by_label_and_named_tokens():
    rows = select(load_matrix(), contexts="16k,tiny=300")
    assert [(r.context, r.input_tokens, r.concurrency) for r in rows] == [
        ("16k", 15872, 1), ("16k", 15872, 2), ("16k", 15872, 4),
        ("tiny", 300, 1), ("tiny", 300, 2), ("tiny", 300, 4),
    ]  # fmt: skip
    assert all(r.output_tokens == 512 for r in rows)
    assert select(load_matrix(), concurrency="2")[0] == MatrixRow("1k", 1000, 2, 512)
    assert len(select(load_matrix(), concurrency="2")) == 5


def test_a_partial_matrix_file_keeps_its_rows(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("# a comment\ncontext,input_tokens,concurrency,output_tokens\n1k,1000,1,512\n\n16k,15488,2,64\n")
    assert load_matrix(f) == [MatrixRow("1k", 1000, 1, 512), MatrixRow("16k", 15488, 2, 64)]
    assert select(load_matrix(f), contexts="16k") == [MatrixRow("16k", 15488, 2, 64)]
    assert MatrixRow("16k", 15488, 2, 64).name == "16k-c2"


@pytest.mark.parametrize(
    "text, message",
    [
        ("context,input,concurrency,output_tokens\n1k,1,1,1\n", "header must be"),
        ("context,input_tokens,concurrency,output_tokens\n", "header but no rows"),
        ("context,input_tokens,concurrency,output_tokens\n1k,1000,0,512\n", "m.csv:2: concurrency must be positive"),
        ("context,input_tokens,concurrency,output_tokens\n1k,lots,1,512\n", "m.csv:2: input_tokens must be an integer"),
        ("context,input_tokens,concurrency,output_tokens\n1k,1000,1\n", "m.csv:2: expected 4 fields"),
        ("# only\n", "no header"),
    ],
)
def test_bad_matrix_files_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "m.csv"
    f.write_text(text)
    with pytest.raises(MatrixError, match=message):
        load_matrix(f)


def test_bad_overrides():
    rows = load_matrix()
    with pytest.raises(MatrixError, match="'huge' is neither a context"):
        select(rows, contexts="huge")
    with pytest.raises(MatrixError, match="--concurrency"):
        select(rows, concurrency="1,0")
    with pytest.raises(MatrixError, match="--output-len must be positive"):
        select(rows, output_len=0)
    with pytest.raises(MatrixError, match="not found"):
        load_matrix(DEFAULT_MATRIX.with_name("missing.csv"))
