"""R8 (issue 10): hostile prompt files fed to ldm-sample. Each file is either handled (the
right images, named from the right line numbers, the prompt text intact) or refused in one
line naming its line, before any image is made; a file whose line k fails while sampling
keeps the k-1 images written before it, and a re-run after the fix makes only the rest."""

import json

import pytest

from bad_inputs import one_line_error
from ldm.cli.sample import main


def sample(model, prompts, outdir, *extra):
    return main(["--model", str(model), "--prompts", str(prompts), "--outdir", str(outdir), "--device", "cpu",
                 "--steps", "2", "--batch-size", "1", *extra])


def made(outdir):
    """{line: prompt} of the manifest, and the PNG files on disk (not the contact sheet)."""
    manifest = outdir / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()] if manifest.exists() else []
    return {r["line"]: r["prompt"] for r in rows}, sorted(p.name for p in outdir.glob("0*.png")) if outdir.exists() else []


REFUSED = {
    "Latin-1 text": ("p.txt", b"a red circle\n" + "un caf\u00e9 vert\n".encode("latin-1"), 2, "not UTF-8"),
    "UTF-16 text": ("p.txt", "a red circle\n".encode("utf-16"), 1, "not UTF-8"),
    "NUL byte": ("p.txt", b"a red circle\na blue\x00 square\n", 2, "NUL"),
    "NUL escape in JSON": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b\\u0000"}\n', 2, "NUL"),
    "bad JSON after BOM, CRLF and an empty line": (
        "p.jsonl", '\ufeff{"prompt": "a"}\r\n\r\n{"prompt": "b",}\r\n'.encode(), 3, "malformed JSON"),
    "unknown key": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b", "sede": 3}\n', 2, "unknown key 'sede'"),
    "NaN guidance scale": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b", "guidance_scale": NaN}\n', 2, "finite"),
    "infinite guidance scale": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b", "guidance_scale": -Infinity}\n', 2, "finite"),
    "seed past 64 bits": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b", "seed": 18446744073709551616}\n', 2, "out of range"),
    "10,000-character line of bad JSON": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "' + b"x" * 10_000 + b'"\n', 2,
                                          "malformed JSON"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_hostile_file_is_refused_with_its_line_before_any_image(tmp_path, tiny_model_dir, capsys, record, case):
    name, data, line, words = REFUSED[case]
    prompts = tmp_path / name
    prompts.write_bytes(data)
    code = sample(tiny_model_dir, prompts, tmp_path / "out")
    error = one_line_error(capsys.readouterr().err)
    manifest, pngs = made(tmp_path / "out")
    held = code == 2 and error is not None and f"line {line}" in error and words in error and not pngs and not manifest
    assert record("R8", f"refused: {case}", held, detail=f"exit {code}; {(error or '')[:160]}"), (code, error, pngs)


LONG = "a red circle " + "and a blue square " * 555  # 10,003 characters
HANDLED = {
    "BOM, CRLF, blank and comment lines": ("p.txt", "\ufeffa red circle\r\n\r\n# note\r\na blue square\r\n".encode(),
                                           {1: "a red circle", 4: "a blue square"}),
    "old Mac CR line ends": ("p.txt", b"a red circle\ra blue square\r", {1: "a red circle", 2: "a blue square"}),
    "empty and blank lines in JSON lines": ("p.jsonl", b'\n\n{"prompt": "a red circle"}\n   \n{"prompt": "a blue square", "seed": 5}\n',
                                            {3: "a red circle", 5: "a blue square"}),
    "10,000-character line": ("p.txt", f"{LONG.strip()}\na blue square\n".encode(), {1: LONG.strip(), 2: "a blue square"}),
}


@pytest.mark.parametrize("case", list(HANDLED))
def test_an_awkward_file_is_handled_line_by_line(tmp_path, tiny_model_dir, capsys, record, case):
    name, data, expected = HANDLED[case]
    prompts = tmp_path / name
    prompts.write_bytes(data)
    code = sample(tiny_model_dir, prompts, tmp_path / "out")
    capsys.readouterr()
    manifest, pngs = made(tmp_path / "out")
    held = code == 0 and manifest == expected and [p[:5] for p in pngs] == [f"{n:05d}" for n in sorted(expected)]
    assert record("R8", f"handled: {case}", held, detail=f"exit {code}; lines {sorted(manifest)}; {len(pngs)} images"), (
        code, {k: v[:40] for k, v in manifest.items()}, pngs)


def test_line_k_failing_keeps_the_images_before_it(tmp_path, tiny_model_dir, capsys, record):
    """Line 3 of 4 sets a guidance scale (1e38) whose sampling overflows to NaN: the run stops naming
    line 3, with the images of lines 1-2 written and recorded; fixed and re-run, it makes lines 3-4
    only and leaves lines 1-2's files as they were."""
    lines = ['{"prompt": "a red circle"}', '{"prompt": "a blue square"}',
             '{"prompt": "a green triangle", "guidance_scale": 1e38}', '{"prompt": "a cyan circle"}']
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out"
    prompts.write_text("\n".join(lines) + "\n")
    code = sample(tiny_model_dir, prompts, out)
    error = one_line_error(capsys.readouterr().err)
    manifest, pngs = made(out)
    before = {p: (out / p).read_bytes() for p in pngs}
    stamps = {p: (out / p).stat().st_mtime_ns for p in pngs}
    lines[2] = '{"prompt": "a green triangle"}'
    prompts.write_text("\n".join(lines) + "\n")
    again = sample(tiny_model_dir, prompts, out)
    rerun = capsys.readouterr().out
    manifest_after, pngs_after = made(out)
    rows = (out / "manifest.jsonl").read_text().splitlines()
    held = (code == 2 and error is not None and "line 3" in error and "2 images made before it are kept" in error
            and sorted(manifest) == [1, 2] and len(pngs) == 2
            and again == 0 and "2 already in" in rerun and sorted(manifest_after) == [1, 2, 3, 4] and len(rows) == 4
            and all((out / p).read_bytes() == before[p] and (out / p).stat().st_mtime_ns == stamps[p] for p in pngs)
            and len(pngs_after) == 4)
    assert record("R8", "line 3 of 4 fails while sampling: lines 1-2 kept, re-run completes", held,
                  detail=f"exit {code} then {again}; {error}"), (code, error, manifest, again, manifest_after)
