"""Prompt files: .txt and .jsonl, line numbers, and one-line errors."""

import pytest

from ldm.errors import LdmError
from ldm.prompts import PromptRecord, read_prompts


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_txt_skips_blanks_and_comments_keeps_line_numbers(tmp_path):
    path = write(tmp_path, "p.txt", b"# header\na red circle\n\n   \n  a blue square  \n#a comment\na cat \xf0\x9f\x90\x88\n")
    assert [(r.line, r.prompt) for r in read_prompts(path)] == [(2, "a red circle"), (5, "a blue square"), (7, "a cat \U0001f408")]


def test_txt_crlf_and_bom(tmp_path):
    path = write(tmp_path, "p.txt", "\ufeffa red circle\r\n# note\r\na blue square\r\n".encode("utf-8"))
    assert [(r.line, r.prompt) for r in read_prompts(path)] == [(1, "a red circle"), (3, "a blue square")]


def test_jsonl_per_line_fields(tmp_path):
    path = write(tmp_path, "p.jsonl", (
        '\ufeff{"prompt": "a red circle"}\r\n'
        "\n"
        '{"prompt": "a blue square", "negative_prompt": "blurry", "seed": 42, "guidance_scale": 3, "num_inference_steps": 10}\n'
    ).encode("utf-8"))
    assert read_prompts(path) == [
        PromptRecord(line=1, prompt="a red circle"),
        PromptRecord(line=3, prompt="a blue square", negative_prompt="blurry", seed=42, guidance_scale=3, num_inference_steps=10),
    ]


@pytest.mark.parametrize("name, text, words", [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', r"line 2: malformed JSON"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "sede": 3}\n', r"line 2: unknown key 'sede'"),
    ("p.jsonl", '{"prompt": "a", "seed": "7"}\n', r"line 1: 'seed' must be an integer"),
    ("p.jsonl", '{"prompt": "a", "seed": true}\n', r"line 1: 'seed' must be"),
    ("p.jsonl", '{"negative_prompt": "a"}\n', r"line 1: missing or empty \"prompt\""),
    ("p.jsonl", '["a red circle"]\n', r"line 1: expected a JSON object"),
    ("p.jsonl", '{"prompt": "a", "num_inference_steps": 0}\n', r"line 1: num_inference_steps must be at least 1"),
    ("p.txt", "\n# only comments\n\n", r"no prompts in .*p\.txt"),
    ("p.jsonl", "", r"no prompts in .*p\.jsonl"),
    ("p.csv", "a red circle\n", r"unknown prompt file type '\.csv'"),
])
def test_bad_files_raise_one_line(tmp_path, name, text, words):
    path = write(tmp_path, name, text.encode("utf-8"))
    with pytest.raises(LdmError, match=words) as e:
        read_prompts(path)
    assert "\n" not in str(e.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(LdmError, match="prompt file not found"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(LdmError, match="not UTF-8"):
        read_prompts(write(tmp_path, "latin1.txt", "café\n".encode("latin-1")))


def test_a_latin1_file_is_refused_with_its_line_number(tmp_path):
    """Issue 10: fails on the main of 2026-11-30 (the message gave a byte offset only)."""
    data = "\ufeffa red circle\r\na blue square\r\nun caf\u00e9 vert\r\n".encode("utf-8")[:-len("\u00e9 vert\r\n".encode())]
    data += "\u00e9 vert\r\n".encode("latin-1")
    with pytest.raises(LdmError, match="not UTF-8") as e:
        read_prompts(write(tmp_path, "latin1.txt", data))
    assert "line 3:" in str(e.value) and "0xe9" in str(e.value) and "column 7" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["nul.txt", "nul.jsonl"])
def test_a_nul_byte_is_refused_with_its_line_number(tmp_path, name):
    """Issue 10: fails on the main of 2026-11-30 (the NUL was kept in the prompt and the PNG metadata)."""
    line = '{"prompt": "a red\\u0000 circle"}' if name.endswith("jsonl") else "a red\x00 circle"
    text = ("a blue square\n" if name.endswith("txt") else '{"prompt": "a blue square"}\n') + line + "\n"
    with pytest.raises(LdmError, match="NUL") as e:
        read_prompts(write(tmp_path, name, text.encode("utf-8")))
    assert "line 2:" in str(e.value) and "\n" not in str(e.value)
