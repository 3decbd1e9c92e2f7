"""cnn_probe: what does the VLM's convolutional stem reach when trained on age directly?

A diagnostic beside ``benchmarks.learning``: it builds (or reuses) the same realistic cohort, reads
every T1 as the benchmark does (4 mm, 48 x 64 x 48 around the head, z-score over the brain), and
trains the tower's own patch embedding (:class:`umbrella.model.modeling_brain_vit.BrainPatchEmbedding`
with ``embed=conv``, ``stem_style`` and ``stem_channels`` as given) followed by the mean over its
tokens and one linear output, with the squared error of the standardised age, as brain-age CNNs
train: AdamW, a one-cycle schedule, left-right flips of the training images, the epoch of the best
validation MAE kept. No language model, no prompt: if this reaches an age MAE the VLM does not,
the stem can represent what the task needs and what is missing is the training signal that
reaches it through the language model's answer tokens.

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
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

IMAGE, VOXEL, PATCH = (48, 64, 48), 4.0, 16  # the learning benchmark's T1 inputs (T1_SETTINGS)


def load_inputs(plan, log=print) -> dict:
    """Every age record's T1 as the model reads it, with its age and split (float16 in RAM)."""
    from umbrella.data.volumes import VolumeSpec, preprocess_volume
    from umbrella.task_registry import AGE

    path = next(p for p in plan.records["T1"] if Path(p).name.startswith(f"{AGE.name}_"))
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    spec = VolumeSpec(image_size=IMAGE, voxel_size=(VOXEL,) * 3)
    start = time.time()
    images = np.stack([preprocess_volume(plan.cohort.root / r["images"][0]["path"], spec,
                                         record_id=r["id"]).astype(np.float16) for r in records])
    log(f"cnn_probe: {len(records)} images read in {time.time() - start:.0f} s")
    return {"X": images, "age": np.array([r["metadata"]["value"] for r in records], float),
            "split": np.array([r["split"] for r in records])}


def train_seed(data: dict, seed: int, epochs: int, style: str, channels: list[int],
               batch: int = 16, log=print) -> dict:
    import torch
    from torch import nn

    from umbrella.evaluation.metrics import bootstrap_ci
    from umbrella.model.modeling_brain_vit import BrainPatchEmbedding

    torch.manual_seed(seed)
    X = torch.from_numpy(data["X"])
    age = torch.tensor(data["age"], dtype=torch.float32)
    idx = {s: torch.from_numpy(np.flatnonzero(data["split"] == s)) for s in ("train", "val", "test")}
    mu, sd = age[idx["train"]].mean(), age[idx["train"]].std()
    spec = {"in_channels": 1, "image_size": list(IMAGE), "patch_size": [PATCH] * 3, "embed": "conv",
            "stem_channels": channels, "stem_style": style}
    embed = BrainPatchEmbedding(64, spec, "T1")
    for conv in [m for m in embed.modules() if isinstance(m, nn.Conv3d)]:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 1))
    net = nn.ModuleDict({"embed": embed, "head": head})

    def forward(x):
        return head(embed(x.float()[:, None]).mean(1)).squeeze(1)

    def predict(which):
        net.eval()
        with torch.no_grad():
            out = torch.cat([forward(X[which[i:i + 50]]) for i in range(0, len(which), 50)])
        net.train()
        return (out * sd + mu).numpy()

    steps = epochs * (len(idx["train"]) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    best, start = {"val": float("inf")}, time.time()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = idx["train"][torch.randperm(len(idx["train"]), generator=gen)]
        for i in range(0, len(order) - batch + 1, batch):
            rows = order[i:i + batch]
            x = X[rows].clone()
            flip = torch.rand(len(rows), generator=gen) < 0.5
            x[flip] = x[flip].flip(1)  # left-right (RAS+: the first axis)
            loss = nn.functional.mse_loss(forward(x), (age[rows] - mu) / sd)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = float(np.abs(predict(idx["val"]) - data["age"][idx["val"].numpy()]).mean())
        log(f"  seed {seed} epoch {epoch + 1}/{epochs}: validation MAE {val:.3f} "
            f"({time.time() - start:.0f} s)")
        if val < best["val"]:
            errors = np.abs(predict(idx["test"]) - data["age"][idx["test"].numpy()])
            best = {"val": val, "epoch": epoch + 1, "test": float(errors.mean()),
                    "ci": bootstrap_ci(lambda rows, e=errors: {"mae": float(e[rows].mean())},
                                       len(errors), seed=seed)["mae"]}
    return {**best, "seconds": round(time.time() - start, 1), "n_test": len(idx["test"])}


def main(argv=None) -> dict:
    from benchmarks import learning

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=common.REPO / "benchmarks" / "_work")
    p.add_argument("--subjects", type=int, default=learning.SUBJECTS)
    p.add_argument("--csf-contrast", type=float, default=0.0, metavar="C")
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
    data = load_inputs(plan)
    channels = [int(c) for c in args.channels.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [train_seed(data, s, args.epochs, args.style, channels) for s in seeds]
    tests = [r["test"] for r in runs]
    result = {"style": args.style, "channels": channels, "epochs": args.epochs,
              "csf_contrast": args.csf_contrast, "subjects": args.subjects, "seeds": seeds,
              "per_seed": runs, "mean": statistics.mean(tests),
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
