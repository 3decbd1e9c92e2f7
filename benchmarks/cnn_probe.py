"""cnn_probe: what does the VLM's convolutional stem reach when trained on age directly?

A diagnostic beside ``benchmarks.learning``, on the same realistic cohort and split: per seed,
`umbrella pretrain` trains the tower's patch embedding alone (``pretrain.encoder_layers=false``:
the convolutional stem of ``model.stem_style`` / ``model.stem_channels``, its projection and
positions, the mean over its tokens and one linear output) on age alone, with the squared error
of the standardised age, as brain-age CNNs train (AdamW one-cycle, left-right flips, the epoch of
the lowest validation loss kept), with the T1 inputs and stem settings of the learning
benchmark's first stage (``learning.TWO_STAGE_SETTINGS``). The kept stem and head then answer the
test split (:func:`umbrella.training.pretrain.score`). No language model, no prompt: if this
reaches an age MAE the VLM does not, the stem can represent what the task needs and what is
missing is the training signal that reaches it through the language model's answer tokens.

Usage: python -m benchmarks.cnn_probe [--workdir DIR] [--subjects 2000] [--csf-contrast C]
                                      [--seeds 0,1,2] [--epochs 12] [--style pooled|strided]
                                      [--channels 8,16,32,64] [--smoke]
Prints the test MAE per seed (bootstrap 95% CI over test subjects) and mean +- sd over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


def probe_settings(epochs: int, style: str, channels: list[int]) -> list[str]:
    """The first stage of the learning benchmark, on age alone, heads on the patch embeddings."""
    from benchmarks import learning

    return [*learning.TWO_STAGE_SETTINGS, "dataset.tasks=[age]", "pretrain.encoder_layers=false",
            f"pretrain.epochs={epochs}", f"model.stem_style={style}",
            f"model.stem_channels=[{','.join(map(str, channels))}]"]


def train_seed(plan, seed: int, run_root: Path, settings: list[str], quiet: bool) -> dict:
    """`umbrella pretrain` of one seed, then its stem and head on the test split."""
    from benchmarks import learning
    from umbrella.data.catalog import by_split, load_config_records
    from umbrella.training.pretrain import INFO_FILE, pretrain, score

    folder = run_root / f"seed{seed}"
    cfg = learning._part_config(plan, "T1", seed, run_root,
                                [*settings, f"pretrain.output_dir={folder}"])
    pretrain(cfg, progress=not quiet, log=learning._quiet if quiet else print)
    info = json.loads((folder / INFO_FILE).read_text())
    test = score(folder, by_split(load_config_records(cfg))["test"], seed=seed)["T1__age"]
    kept = info["epochs"][info["kept_epoch"] - 1]
    return {"test": test["mae"], "ci": test["ci"], "n_test": test["n"],
            "epoch": info["kept_epoch"], "val": kept["val"]["tasks"]["T1__age"]["mae"],
            "seconds": info["seconds"], "folder": str(folder)}


def main(argv=None) -> dict:
    from benchmarks import learning

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=common.REPO / "benchmarks" / "_work")
    p.add_argument("--subjects", type=int, default=learning.SUBJECTS)
    p.add_argument("--csf-contrast", type=float, default=learning.CSF_CONTRAST, metavar="C")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--style", default="pooled", choices=("pooled", "strided"))
    p.add_argument("--channels", default="8,16,32,64")
    p.add_argument("--smoke", action="store_true", help="60 subjects, 2 epochs, one seed")
    args = p.parse_args(argv)
    if args.smoke:
        args.subjects, args.epochs, args.seeds = 60, 2, "0"
    common.setup()
    plan = learning.prepare(args.workdir, ["T1"], args.subjects, [], quiet=args.smoke,
                            csf_contrast=args.csf_contrast)
    channels = [int(c) for c in args.channels.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = probe_settings(args.epochs, args.style, channels)
    run_root = args.workdir / "cnn_probe_runs"
    runs = [train_seed(plan, s, run_root, settings, args.smoke) for s in seeds]
    tests = [r["test"] for r in runs]
    result = {"style": args.style, "channels": channels, "epochs": args.epochs,
              "csf_contrast": args.csf_contrast, "subjects": args.subjects, "seeds": seeds,
              "settings": settings, "per_seed": runs, "mean": statistics.mean(tests),
              "sd": statistics.stdev(tests) if len(tests) > 1 else 0.0}
    for s, r in zip(seeds, runs, strict=True):
        print(f"cnn_probe seed {s}: test age MAE {r['test']:.3f} [{r['ci'][0]:.2f}, "
              f"{r['ci'][1]:.2f}] (n={r['n_test']}), validation {r['val']:.3f} at epoch "
              f"{r['epoch']}, {r['seconds']:.0f} s")
    print(f"cnn_probe ({args.style} stem {channels}): age MAE {result['mean']:.3f} +- "
          f"{result['sd']:.3f} over {len(seeds)} seed(s)")
    return result


if __name__ == "__main__":
    main()
