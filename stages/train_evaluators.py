#!/usr/bin/env python
"""train_evaluators: the networks the metrics need, trained on the same data because no pretrained
weights can be downloaded: a digit classifier (FID features + conditional accuracy) and a tiny CLIP."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import TrackingConfig, TrainEvaluatorsConfig, load_section, to_dict

    cfg = load_section("train_evaluators", TrainEvaluatorsConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    require(args.data, "prepared dataset (stage prepare)")

    import logging
    import time

    from pipeline import data
    from pipeline.io import atomic_dir
    from pipeline.metrics.accuracy import conditional_accuracy
    from pipeline.tracking import stage_run
    from pipeline.train import classifier as clf_mod
    from pipeline.train import tiny_clip

    log = logging.getLogger("pipeline")
    with stage_run("train_evaluators", params=to_dict(cfg), experiment=trk.experiment, uri=trk.uri,
                   inputs=[args.data], log_file=log_path("train_evaluators")) as run_:
        meta = data.load_meta(args.data)
        x, y = data.load_split(args.data, "train")
        rx, ry = data.load_split(args.data, "reference")
        names = meta["class_names"]
        t0 = time.time()
        clf = clf_mod.train_classifier(x, y, len(names), cfg.classifier_steps, cfg.batch_size, cfg.lr, cfg.seed)
        acc = conditional_accuracy(clf, rx, ry)
        t1 = time.time()
        log.info("classifier: reference accuracy %.4f (%.0f s)", acc, t1 - t0)
        clip, tok, proc = tiny_clip.train_clip(x, y, names, cfg.clip_steps, cfg.batch_size, cfg.lr, cfg.seed)
        zs = tiny_clip.clip_zero_shot_accuracy(clip, tok, proc, rx, ry, names)
        log.info("tiny CLIP: zero-shot reference accuracy %.4f (%.0f s)", zs, time.time() - t1)
        with atomic_dir(args.out) as tmp:
            clf_mod.save_classifier(clf, tmp / "classifier")
            tiny_clip.save_clip(clip, tok, proc, tmp / "clip")
        run_.log_metrics({"classifier_accuracy": acc, "clip_zero_shot_accuracy": zs,
                          "classifier_seconds": t1 - t0, "clip_seconds": time.time() - t1})


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--data", default="data/dataset")
    p.add_argument("--out", default="data/evaluators")
    main(run, p)
