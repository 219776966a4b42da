"""What the benches that read a finished ``make repro`` share: the FP model and calibration set of one
backbone from ``data/``, the diffusion / sampling configs and a family's options from params.yaml."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_run(data_root: Path, backbone: str, family: str):
    """(fp backbone in eval mode, calibration set, DiffusionConfig, SamplingConfig, Family, family config).
    Exits with a message naming the missing stage output when ``make repro`` has not made it."""
    from pipeline import models
    from pipeline.calibration import load_calibration
    from pipeline.config import MATRIX_KEYS, DiffusionConfig, SamplingConfig, from_dict, load_section, read_params
    from pipeline.methods import get_family

    fp_dir, calib_dir = Path(data_root) / "fp" / backbone, Path(data_root) / "calib" / backbone
    for p in (fp_dir, calib_dir):
        if not p.exists():
            sys.exit(f"{p} not found: run `make repro` (or dvc repro train_fp@{backbone} calibrate@{backbone}) first")
    params_path = ROOT / "params.yaml"
    params = read_params(params_path)
    fam = get_family(family)
    cfg = from_dict(fam.config_cls, {k: v for k, v in params[family].items() if k not in MATRIX_KEYS}, family)
    fp = models.load_backbone(fp_dir)
    fp.eval()
    return (fp, load_calibration(calib_dir), load_section("diffusion", DiffusionConfig, params_path),
            load_section("sampling", SamplingConfig, params_path), fam, cfg)
