#!/usr/bin/env python
"""quantize: one method family (one DVC item per entry of ``families``): every variant x bit setting x
backbone of its params section, each a real packed low-bit model in
``<out>/<setting>/<variant>/<backbone>`` plus ``<out>/manifest.json`` (see :mod:`pipeline.runner` for the
caching of unchanged jobs and what happens when one fails)."""
import sys

from _common import main, parser


def run(args):
    from pipeline.runner import FamilyRunner
    from pipeline.tracking import setup_logging

    setup_logging()  # this process's progress lines ([i/n] per job); each job's MLflow run logs in its worker

    runner = FamilyRunner(args.family, args.params, args.fp, args.calib, args.out)  # validates first
    failed = runner.run()
    if failed:
        for e in failed:
            print(f"error: {args.family}/{e['variant']}/{e['setting']}@{e['backbone']}: {e['error']}", file=sys.stderr)
        print(f"error: {len(failed)} of {len(runner.jobs)} jobs failed; the others are kept in {args.out} and "
              f"reused when the stage reruns", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--family", required=True, help="a method family listed in params.yaml `families`")
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--calib", default="data/calib")
    p.add_argument("--out", required=True)
    main(run, p)
