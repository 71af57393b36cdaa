"""ldm-report: write a run folder's report.html (or one page for several runs).

    ldm-report runs/unet                                      # -> runs/unet/report.html
    ldm-report runs/demo/vae runs/demo/unet --out runs/demo/report.html
"""

import argparse

from ldm.cli.common import run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run folder(s) (metrics.jsonl, config.yaml, samples/, checkpoints/)")
    p.add_argument("--out", default=None, help="the HTML file (default: RUN_DIR/report.html; required for several runs)")
    p.add_argument("--title", default=None, help="page title")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ldm.eval.report import write_report

    path = write_report(args.run_dirs, args.out, args.title)
    print(f"report: {path}")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
