"""patch_embed: the convolutional stem (model.patch_embed=conv) against the linear patches
(linear, the baseline) of the same run: step time, step memory and a short demo training.

Part 1, step time: forward + backward + grad clip + AdamW of the tiny preset on random images with
the sex task's prompt, linear and conv timed interleaved (as in train_step):

    T1 96³ / patch 16, batch 16               216 tokens, stem 1 -> 16 -> 32 -> 64 -> 128 -> hidden
    rsfMRI 96³x20 / 16³x20, batch 4           216 tokens, the 20 frames are the stem's 20 channels

Part 2, step memory: each variant in a fresh child process (so one variant's heap cannot inflate the
other's): resident memory sampled every 5 ms during two steps, minus the resident memory just
before them (model, optimiser and batch built): what a step adds (activations, gradients, AdamW
state, allocator caching).

Part 3 (skipped with --no-demo), a short learning sanity check: the demo cohort of train_step (sex
planted as brain scale, 96³ / 2.1 mm), the same subjects, split, seed, steps and optimiser for both
embeddings; held-out accuracy by likelihood scoring at the last evaluations. Not the real
comparison: the planted effect is easy for both.

Usage: python -m benchmarks.patch_embed [--quick | --smoke] [--reps N] [--no-demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, train_step  # noqa: E402

MB = 2**20


@dataclass(frozen=True)
class Sizes:
    side: int
    patch: int
    frames: int
    t1_batch: int
    fmri_batch: int
    demo: train_step.Sizes  # the demo part's subjects, steps, batch and evaluation interval


SIZES = {"full": Sizes(96, 16, 20, 16, 4, train_step.SIZES["full"]),
         "quick": Sizes(96, 16, 20, 16, 4, train_step.SIZES["quick"]),
         "smoke": Sizes(16, 8, 2, 2, 2, train_step.SIZES["smoke"])}


def variants(s: Sizes) -> dict[str, tuple[train_step.Variant, int]]:
    """{name: (variant, batch)}: linear and conv for T1 and rsfMRI."""
    t1, patch = (s.side,) * 3, (s.patch,) * 3
    out = {}
    for embed in ("linear", "conv"):
        out[f"T1 {embed}"] = (train_step.Variant(f"T1 {embed}", "T1", t1, patch, embed=embed),
                              s.t1_batch)
        out[f"rsfMRI {embed}"] = (train_step.Variant(f"rsfMRI {embed}", "rsfMRI", (*t1, s.frames),
                                                     (*patch, s.frames), embed=embed), s.fmri_batch)
    return out


def _setup(v: train_step.Variant, batch: int, encoder):
    from umbrella.model.build import tokens_per_image

    model = train_step.build_model(v, encoder).train()
    tokens = tokens_per_image(model, v.modality)
    data = train_step.random_batch(v, encoder, tokens, batch)
    opt, _ = train_step.optimizer(model, 10**6, 0)
    return model, opt, data, tokens


def step_speed(s: Sizes, reps: int) -> dict:
    encoder = common.prompt_encoder()
    setups, fns = {}, {}
    for name, (v, batch) in variants(s).items():
        model, opt, data, tokens = _setup(v, batch, encoder)
        params = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in n)
        setups[name] = (v, batch, tokens, params)
        fns[name] = (lambda m, o, b: lambda i: train_step.train_step(m, o, b))(model, opt, data)
    times = common.time_interleaved(fns, reps, 1, warmup=1)
    return {name: {**common.summary(secs), "modality": setups[name][0].modality,
                   "embed": setups[name][0].embed, "batch": setups[name][1],
                   "tokens_per_image": setups[name][2], "embedding_parameters": setups[name][3]}
            for name, secs in times.items()}


def child_memory(name: str, mode: str, steps: int = 2) -> dict:
    """One variant's step memory, in this process (see the module docstring)."""
    import psutil

    from benchmarks.loader_memory import PeakSampler

    s = SIZES[mode]
    v, batch = variants(s)[name]
    model, opt, data, _ = _setup(v, batch, common.prompt_encoder())
    rss_before = psutil.Process().memory_info().rss
    sampler = PeakSampler()
    sampler.start()
    for _ in range(steps):
        train_step.train_step(model, opt, data)
    sampler.stop()
    return {"rss_before_mb": rss_before / MB, "peak_rss_mb": sampler.peak_rss / MB,
            "step_mb": (sampler.peak_rss - rss_before) / MB}


def step_memory(s: Sizes, mode: str, threads: int, in_process: bool = False) -> dict:
    out = {}
    for name in variants(s):
        if in_process:  # tests: correctness only (figures then include the caller's heap)
            out[name] = child_memory(name, mode)
            continue
        cmd = [sys.executable, "-m", "benchmarks.patch_embed", "--child-memory", name,
               "--threads", str(threads)] + ([f"--{mode}"] if mode != "full" else [])
        done = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"patch_embed memory child ({name}) failed:\n{done.stderr[-3000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def demo(s: Sizes, workdir: Path, seed: int = 0) -> dict:
    from umbrella.demo.cohort import build_demo_cohort

    d = s.demo
    root = workdir / f"demo_{d.demo_subjects}_{s.side}"  # the cohort train_step builds and reuses
    cohort = build_demo_cohort(root, d.demo_subjects, seed=0, image_size=(s.side,) * 3,
                               voxel_mm=2.1 * 96 / s.side, workers=2, progress=False)
    return {embed: train_step.train_demo(train_step.Budget(embed, s.side, s.patch, embed=embed),
                                         cohort, d, seed) for embed in ("linear", "conv")}


def run(opts: common.Options, with_demo: bool = True, in_process: bool = False) -> dict:
    common.setup(opts.threads)
    s = SIZES[opts.mode]
    speed = step_speed(s, opts.reps)
    memory = step_memory(s, opts.mode, opts.threads, in_process)
    rows, ratios = [], {}
    for name, r in speed.items():
        base = name.split()[0] + " linear"
        r.update(memory[name])
        r["time_x_linear"] = r["median_s"] / speed[base]["median_s"]
        r["step_memory_x_linear"] = r["step_mb"] / memory[base]["step_mb"]
        r["peak_rss_x_linear"] = r["peak_rss_mb"] / memory[base]["peak_rss_mb"]
        if r["embed"] == "conv":
            ratios[r["modality"]] = {"time": r["time_x_linear"], "step_memory": r["step_memory_x_linear"]}
        rows.append([name, r["batch"], r["tokens_per_image"], r["embedding_parameters"],
                     r["median_s"], r["time_x_linear"], r["step_mb"], r["step_memory_x_linear"],
                     r["peak_rss_mb"]])
    results = {"step": speed, "conv_vs_linear": ratios}
    notes = [f"tiny preset, forward + backward + clip + AdamW, reps={opts.reps}, median; "
             "baseline: the linear patches of the same modality; step MB = peak RSS during 2 steps "
             "minus RSS before them (fresh process per variant)"
             if opts.mode != "smoke" else "smoke mode: tiny shapes, nothing measured"]
    notes += [f"{m} conv / linear: step time {r['time']:.2f}x, step memory {r['step_memory']:.2f}x"
              for m, r in ratios.items()]
    if with_demo:
        started = time.perf_counter()
        results["demo"] = acc = demo(s, opts.workdir)
        results["demo_seconds"] = time.perf_counter() - started
        for embed, r in acc.items():
            notes.append(f"demo {embed}: {r['steps']} steps x batch {r['batch']}, "
                         f"{r['train_subjects']} train / {r['test_subjects']} test subjects: "
                         f"accuracy {r['accuracy_final']:.3f} (mean of last evaluations "
                         f"{r['accuracy_mean_last']:.3f}, by step "
                         f"{ {k: round(a, 3) for k, a in r['accuracy_by_step'].items()} }), "
                         f"final loss {r['final_loss']:.3f}, {r['step_s_median']:.3f} s/step")
    config = {"mode": opts.mode, "reps": opts.reps, "demo": with_demo,
              **{k: v for k, v in vars(s).items() if k != "demo"}}
    return common.emit("patch_embed", config, results,
                       ["variant", "batch", "tokens/img", "embed params", "s/step", "x linear",
                        "step MB", "x linear", "peak RSS MB"], rows, notes, opts.quiet)


def main(argv=None) -> dict | None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--no-demo", action="store_true", help="step time and memory only")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    opts = common.options(args)
    if args.child_memory:
        common.setup(opts.threads)
        print(json.dumps(child_memory(args.child_memory, opts.mode)), flush=True)
        return None
    return run(opts, with_demo=not args.no_demo)


if __name__ == "__main__":
    main()
