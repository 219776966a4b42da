#!/usr/bin/env python
"""prepare: the dataset (scikit-learn digits by default, or a local image folder), split into
train and a held-out reference set for FID."""
from _common import log_path, main, parser


def run(args):
    from pipeline.config import PrepareConfig, TrackingConfig, load_section, to_dict

    cfg = load_section("prepare", PrepareConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)

    from pipeline import data
    from pipeline.io import atomic_dir
    from pipeline.tracking import stage_run

    with stage_run("prepare", params=to_dict(cfg), experiment=trk.experiment, uri=trk.uri,
                   tags={"source": cfg.source}, log_file=log_path("prepare")) as run_:
        images, labels, class_names = data.load_images(cfg)
        tx, ty, rx, ry = data.split_reference(images, labels, cfg.reference_fraction, cfg.seed)
        with atomic_dir(args.out) as tmp:
            data.save_dataset(tmp, tx, ty, rx, ry, class_names)
        run_.log_metrics({"n_train": len(ty), "n_reference": len(ry), "n_classes": len(class_names)})
        import logging
        logging.getLogger("pipeline").info(
            "prepare: %d train / %d reference images, %d classes, %s", len(ty), len(ry),
            len(class_names), tuple(images.shape[1:]))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--out", default="data/dataset")
    main(run, p)
