"""The figures of the reliability battery (issue 10), written into docs/reliability.md.

`make reliability` runs tests/reliability with LDM_RELIABILITY_OUT=runs/reliability; each
case appends a row (family, case, held, detail) to runs/reliability/<family>.jsonl. This
script prints held / total per family and every case that did not hold, and replaces the
part of docs/reliability.md between the battery markers with the same figures, the date
and the machine.

    python bench/reliability_report.py --rows runs/reliability --doc docs/reliability.md
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.eval.machine import machine_info  # noqa: E402

FAMILIES = {
    "R1": "kill -9 at seeded moments (stage 1, stage 2, control stage): resumed run identical",
    "R2": "checkpoint integrity (truncated, corrupt, missing, foreign files): refused, nothing restored",
    "R3": "samples per resumed epoch, 1 and 2 processes, folder and shard data: no duplicate, no miss",
    "R4": "changed settings on resume: refused or allowed as specified",
    "R5": "bad data (corrupt/truncated images, bad captions, a decompression bomb): run finishes, skips named",
    "R6": "non-finite values injected: steps skipped on all ranks, stop after K, nothing non-finite saved",
    "R7": "untrusted pickles in every file a run, cache or model folder holds: never executed",
    "R8": "hostile prompt files: handled or refused with the line number, nothing lost",
    "R9": "SIGTERM to one rank, all ranks, the launcher (2 processes): checkpoint and clean exit in bounded time",
    "R10": "read-only folder, full disk during a checkpoint: one-line error, earlier checkpoints intact",
}
START, END = "<!-- reliability-battery:start -->", "<!-- reliability-battery:end -->"


def load_rows(folder: Path):
    rows = {}
    for family in FAMILIES:
        path = folder / f"{family}.jsonl"
        rows[family] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return rows


def render(rows) -> str:
    machine = machine_info()
    lines = [
        f"Run of `make reliability` on {datetime.date.today().isoformat()}; machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".",
        "",
        "| family | what | held / total |",
        "| --- | --- | --- |",
    ]
    for family, title in FAMILIES.items():
        held = sum(r["held"] for r in rows[family])
        lines.append(f"| {family} | {title} | {held} / {len(rows[family])} |" if rows[family] else f"| {family} | {title} | not run |")
    failed = [r for family in FAMILIES for r in rows[family] if not r["held"]]
    lines += ["", "Cases that did not hold: " + ("none." if not failed else "")]
    lines += [f"- {r['family']} {r['case']}: {r['detail']} ({r['test']})" for r in failed]
    lines += ["", "<details><summary>Every case</summary>", "", "| family | case | held | detail |", "| --- | --- | --- | --- |"]
    for family in FAMILIES:
        for r in rows[family]:
            detail = str(r["detail"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {family} | {r['case']} | {'yes' if r['held'] else '**no**'} | {detail} |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="runs/reliability", help="folder of the battery's <family>.jsonl rows")
    p.add_argument("--doc", default="docs/reliability.md", help="the document whose battery section is rewritten")
    args = p.parse_args(argv)
    rows = load_rows(Path(args.rows))
    text = render(rows)
    print(text.split("<details>")[0])
    doc = Path(args.doc)
    old = doc.read_text()
    if START in old and END in old:
        new = old.split(START)[0] + START + "\n" + text + "\n" + END + old.split(END)[1]
    else:
        new = old.rstrip("\n") + "\n\n## The battery: `make reliability`\n\n" + START + "\n" + text + "\n" + END + "\n"
    doc.write_text(new)
    held = sum(r["held"] for family in rows.values() for r in family)
    total = sum(len(family) for family in rows.values())
    if total == 0 or held < total:
        sys.exit(f"reliability battery: {held} / {total} cases held")


if __name__ == "__main__":
    main()
