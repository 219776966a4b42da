#!/usr/bin/env python
"""validate: check every section of params.yaml (types, allowed values, bit settings, each method family's
options, variants and backbones) before any compute, and write one normalised JSON stamp per section
(and per sub-mapping) into ``--out``. Every other stage depends on the stamps of the sections it reads,
so DVC runs this first and a params change re-runs only the stages whose own stamps changed."""
from _common import main, parser


def run(args):
    import json
    import logging

    from pipeline.io import atomic_dir
    from pipeline.validation import stamps, validate_params

    normalised = validate_params(args.params)  # ConfigError -> exit 2 naming the key
    files = stamps(normalised)
    with atomic_dir(args.out) as tmp:
        for name, value in files.items():
            (tmp / name).write_text(json.dumps(value, sort_keys=True, indent=1) + "\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline").info("validate: %s is valid (%d sections, families: %s)", args.params,
                                       len(normalised), ", ".join(normalised["families"]))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--out", default="data/params")
    main(run, p)
