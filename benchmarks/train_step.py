"""train_step: speed of one training step of the tiny preset per modality and visual-token budget,
and the demo accuracy each budget reaches.

Part 1, step speed (forward + backward + grad clip + AdamW, random images, the real prompt of the
sex task), timed interleaved over the variants:

    T1 96³ / patch 16                216 tokens   ours (the default)
    rsfMRI 96³x20 / 16³x20           216 tokens   window as the dataset gives it today, (D, H, W, T)
    rsfMRI, (T,D,H,W) memory         216 tokens   the same values laid out time-outermost in memory
    dMRI 96³ / patch 16              216 tokens
    T1 120³ / patch 10              1728 tokens   the original UMBRELLA budget (the baseline)
    T1 96³ / patch 16, pool 2         27 tokens   optional token pooling before the projector

Part 2, demo accuracy: the same cohort (demo cohort builder, sex planted as brain scale) at 96³ /
2.1 mm and at 120³ / 1.68 mm (the same field of view), the same subjects, split, seed, steps and
optimiser (AdamW 1e-3, betas 0.9/0.95, wd 0.01, clip 1, warmup then cosine), trained with the
real data path (InstructionDataset memo, ModalityBatchSampler, BrainCollator); held-out accuracy
by likelihood scoring of "male"/"female" at the last evaluations.

Usage: python -m benchmarks.train_step [--quick | --smoke] [--reps N] [--no-demo] [--profile]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    modality: str
    image_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    pool: int | None = None
    stored_order: bool = False  # rsfMRI batch as a (B, 1, D, H, W, T) view of (B, 1, T, D, H, W)
    embed: str = "linear"  # model.patch_embed: linear | conv


@dataclass(frozen=True)
class Sizes:
    batch: int  # step timing batch
    steps_per_rep: int
    side: int  # "ours": side / patch
    patch: int
    orig_side: int  # original budget: orig_side / orig_patch
    orig_patch: int
    frames: int
    demo_subjects: int
    demo_steps: int
    demo_batch: int
    eval_every: int


SIZES = {"full": Sizes(8, 1, 96, 16, 120, 10, 20, 100, 100, 8, 20),
         "quick": Sizes(8, 1, 96, 16, 120, 10, 20, 60, 60, 8, 20),
         "smoke": Sizes(2, 1, 16, 8, 20, 5, 2, 6, 2, 2, 1)}


def variants(s: Sizes) -> list[Variant]:
    ours, orig = (s.side,) * 3, (s.orig_side,) * 3
    patch = (s.patch,) * 3
    return [Variant("T1 (ours)", "T1", ours, patch),
            Variant("rsfMRI", "rsfMRI", (*ours, s.frames), (*patch, s.frames)),
            Variant("rsfMRI, (T,D,H,W) memory", "rsfMRI", (*ours, s.frames), (*patch, s.frames),
                    stored_order=True),
            Variant("dMRI", "dMRI", ours, patch),
            Variant("T1 original budget", "T1", orig, (s.orig_patch,) * 3),
            Variant("T1 pool 2", "T1", ours, patch, pool=2)]


def build_model(v: Variant, encoder, seed: int = 0):
    from umbrella.config import ModelConfig
    from umbrella.model.build import build_brain_llava

    geom = {v.modality: {"image_size": list(v.image_size), "patch_size": list(v.patch_size)}}
    return build_brain_llava(ModelConfig(max_length=4096, patch_embed=v.embed), geom, encoder.tok,
                             seed=seed, token_pool=v.pool)


def optimizer(model, steps: int, warmup: int):
    import torch
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    return opt, get_cosine_schedule_with_warmup(opt, warmup, steps)


def train_step(model, opt, batch, sched=None) -> float:
    """One optimiser step on a collated batch; returns the loss."""
    import torch

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                    "image_order")}
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def random_batch(v: Variant, encoder, tokens: int, batch: int) -> dict:
    """A collated batch of ``batch`` sex-task samples with random images of variant ``v``."""
    from umbrella.data.collate import BrainCollator

    samples = common.make_samples(encoder, v.modality, v.image_size, batch, tokens=tokens)
    out = BrainCollator(encoder.tok.pad_token_id, pad_to_multiple_of=8)(samples)
    if v.stored_order:  # same values, time-outermost memory: (B, 1, T, D, H, W) seen as (..., T)
        pv = out["pixel_values"][v.modality]
        out["pixel_values"][v.modality] = pv.permute(0, 1, 5, 2, 3, 4).contiguous().permute(
            0, 1, 3, 4, 5, 2)
    return out


def text_tokens(batch: dict, tokens_per_image: int) -> int:
    """Non-image, non-padding tokens of a batch."""
    return int(batch["attention_mask"].sum()) - tokens_per_image * len(batch["image_order"])


def step_speed(s: Sizes, reps: int, chosen: list[Variant] | None = None) -> dict:
    """Per variant: seconds per step (median), samples/s, visual and text tokens/s."""
    from umbrella.model.build import tokens_per_image

    encoder = common.prompt_encoder()
    chosen = chosen or variants(s)
    setups, fns = {}, {}
    for v in chosen:
        model = build_model(v, encoder).train()
        tokens = tokens_per_image(model, v.modality)
        batch = random_batch(v, encoder, tokens, s.batch)
        opt, _ = optimizer(model, 10**6, 0)
        setups[v.name] = (v, tokens, batch)
        fns[v.name] = (lambda m, o, b: lambda i: train_step(m, o, b))(model, opt, batch)
    times = common.time_interleaved(fns, reps, s.steps_per_rep, warmup=1)
    out = {}
    for name, secs in times.items():
        v, tokens, batch = setups[name]
        med = common.median(secs)
        text = text_tokens(batch, tokens)
        out[name] = {**common.summary(secs), "modality": v.modality, "tokens_per_image": tokens,
                     "image_size": list(v.image_size), "patch_size": list(v.patch_size),
                     "pool": v.pool, "batch": s.batch, "samples_per_s": s.batch / med,
                     "visual_tokens_per_s": s.batch * tokens / med, "text_tokens_per_s": text / med,
                     "tokens_per_s": (s.batch * tokens + text) / med}
    return out


def profile_steps(s: Sizes, top: int = 6) -> dict:
    """torch.profiler of one step per variant: the ``top`` ops by self CPU time, with shares."""
    import torch

    from umbrella.model.build import tokens_per_image

    encoder = common.prompt_encoder()
    out = {}
    for v in variants(s):
        model = build_model(v, encoder).train()
        batch = random_batch(v, encoder, tokens_per_image(model, v.modality), s.batch)
        opt, _ = optimizer(model, 10**6, 0)
        train_step(model, opt, batch)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train_step(model, opt, batch)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) or 1
        out[v.name] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
                        "share": e.self_cpu_time_total / total} for e in events[:top]]
    return out


# ------------------------------------------------------------------------------------ demo

@dataclass(frozen=True)
class Budget:
    name: str
    side: int
    patch: int
    pool: int | None = None
    embed: str = "linear"  # model.patch_embed: linear | conv


def budgets(s: Sizes) -> list[Budget]:
    return [Budget("ours", s.side, s.patch), Budget("original", s.orig_side, s.orig_patch),
            Budget("ours + pool 2", s.side, s.patch, 2)]


def demo_cohorts(s: Sizes, workdir: Path) -> dict[int, object]:
    """The demo cohort at each side (same subjects, same field of view); reused between runs."""
    from umbrella.demo.cohort import build_demo_cohort

    out = {}
    for side in sorted({s.side, s.orig_side}):
        root = workdir / f"demo_{s.demo_subjects}_{side}"
        out[side] = build_demo_cohort(root, s.demo_subjects, seed=0, image_size=(side,) * 3,
                                      voxel_mm=2.1 * 96 / side, workers=2,
                                      progress=False)
    return out


def demo_records(cohort) -> dict[str, list]:
    from umbrella.tasks.conversations import subject_splits

    subjects = cohort.subjects
    split = subject_splits([x.subject_id for x in subjects], [x.sex for x in subjects],
                           (0.7, 0.0, 0.3), seed=12345)
    recs = {"train": [], "test": []}
    for i, x in enumerate(subjects):
        rec = common.sex_record(i, "T1", cohort.root / x.t1_path, x.sex, split[x.subject_id])
        recs[rec.split].append(replace(rec, subject_id=x.subject_id))
    return recs


def accuracy(model, encoder, data, batch: int = 8) -> float:
    """Held-out accuracy by likelihood scoring of the task's two options."""
    import torch

    from umbrella.model.answering import score_options

    model.eval()
    correct = 0
    for start in range(0, len(data), batch):
        idx = range(start, min(start + batch, len(data)))
        samples = [data.scoring_sample(i) for i in idx]
        scores = score_options(model, encoder, samples, [["male", "female"]] * len(samples))
        for i, sc in zip(idx, scores, strict=True):
            correct += ["male", "female"][int(torch.argmax(sc))] == data.records[i].answer
    model.train()
    return correct / len(data)


def train_demo(b: Budget, cohort, s: Sizes, seed: int = 0) -> dict:
    """Train one budget on the demo cohort; held-out accuracy at the last evaluations."""
    import torch
    from torch.utils.data import DataLoader

    from umbrella.data.collate import BrainCollator
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.inputs import ModalityInput
    from umbrella.data.sampling import ModalityBatchSampler
    from umbrella.data.volumes import VolumeSpec
    from umbrella.model.build import tokens_per_image

    encoder = common.prompt_encoder()
    v = Variant(b.name, "T1", (b.side,) * 3, (b.patch,) * 3, b.pool, embed=b.embed)
    model = build_model(v, encoder, seed).train()
    inputs = {"T1": ModalityInput("T1", VolumeSpec(image_size=(b.side,) * 3),
                                  tokens_per_image(model, "T1"))}
    recs = demo_records(cohort)
    train = InstructionDataset(recs["train"], encoder, inputs, seed=seed, memoize=True)
    test = InstructionDataset(recs["test"], encoder, inputs, seed=seed, memoize=True)
    for data in (train, test):  # decode every volume once, outside the timed steps
        for i in range(len(data)):
            data.load_array(data.records[i], 0)
    sampler = ModalityBatchSampler(train.item_groups(), s.demo_batch, seed=seed, drop_last=True)
    loader = DataLoader(train, batch_sampler=sampler,
                        collate_fn=BrainCollator(encoder.tok.pad_token_id, pad_to_multiple_of=8))
    opt, sched = optimizer(model, s.demo_steps, min(20, s.demo_steps // 5))
    torch.manual_seed(seed)
    step, epoch, step_times, evals, losses = 0, 0, [], {}, []
    eval_at = {s.demo_steps - k * s.eval_every for k in range(3)}
    while step < s.demo_steps:
        sampler.set_epoch(epoch)
        train.set_epoch(epoch)
        for batch in loader:
            start = time.perf_counter()
            losses.append(train_step(model, opt, batch, sched))
            step_times.append(time.perf_counter() - start)
            step += 1
            if step in eval_at:
                evals[step] = accuracy(model, encoder, test)
            if step >= s.demo_steps:
                break
        epoch += 1
    last = [evals[k] for k in sorted(evals)]
    return {"tokens_per_image": inputs["T1"].tokens, "embed": b.embed, "image_size": b.side, "patch": b.patch,
            "pool": b.pool, "train_subjects": len(train), "test_subjects": len(test),
            "steps": step, "batch": s.demo_batch, "step_s_median": common.median(step_times),
            "train_seconds": sum(step_times), "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "accuracy_by_step": evals, "accuracy_final": last[-1],
            "accuracy_mean_last": sum(last) / len(last)}


def demo(s: Sizes, workdir: Path, seed: int = 0) -> dict:
    cohorts = demo_cohorts(s, workdir)
    return {b.name: train_demo(b, cohorts[b.side], s, seed) for b in budgets(s)}


# ------------------------------------------------------------------------------------ report

def run(opts: common.Options, with_demo: bool = True, profile: bool = False) -> dict:
    common.setup(opts.threads)
    s = SIZES[opts.mode]
    speed = step_speed(s, opts.reps)
    base = speed["T1 original budget"]
    for r in speed.values():
        r["per_sample_speedup_vs_original"] = r["samples_per_s"] / base["samples_per_s"]
    results = {"step": speed}
    rows = [[n, r["tokens_per_image"], r["median_s"], r["samples_per_s"], r["visual_tokens_per_s"],
             r["text_tokens_per_s"], r["per_sample_speedup_vs_original"]] for n, r in speed.items()]
    notes = [f"batch {s.batch}, tiny preset, forward + backward + clip + AdamW; reps={opts.reps}, "
             "median; baseline: T1 original budget (1728 tokens at 120³ / patch 10)"
             if opts.mode != "smoke" else "smoke mode: tiny shapes, nothing measured"]
    if profile:
        results["profiles"] = profile_steps(s)
        notes += [f"profile {name}: " + "; ".join(f"{r['op']} {r['share']:.0%}" for r in rows)
                  for name, rows in results["profiles"].items()]
    ours = speed["T1 (ours)"]["per_sample_speedup_vs_original"]
    targets = {"default_budget_at_least_4x_faster_per_sample": {"value": ours, "met": ours >= 4}}
    if with_demo:
        started = time.perf_counter()
        acc = demo(s, opts.workdir, seed=0)
        results["demo"] = acc
        results["demo_seconds"] = time.perf_counter() - started
        for name, r in acc.items():
            notes.append(f"demo {name}: {r['tokens_per_image']} tokens, {r['steps']} steps x "
                         f"batch {r['batch']}, {r['train_subjects']} train / {r['test_subjects']} "
                         f"test subjects: accuracy {r['accuracy_final']:.3f} (mean of last "
                         f"evaluations {r['accuracy_mean_last']:.3f}, by step "
                         f"{ {k: round(a, 3) for k, a in r['accuracy_by_step'].items()} }), "
                         f"{r['step_s_median']:.3f} s/step, {r['train_seconds']:.0f} s")
        equal_or_better = (acc["ours"]["accuracy_mean_last"]
                           >= acc["original"]["accuracy_mean_last"] - 1e-9)
        targets["default_budget_at_least_4x_faster_per_sample"]["demo_accuracy_equal_or_better"] = \
            equal_or_better
        targets["default_budget_at_least_4x_faster_per_sample"]["met"] = ours >= 4 and equal_or_better
    results["targets"] = targets
    t = targets["default_budget_at_least_4x_faster_per_sample"]
    notes.append(f"target default budget >= 4x faster per sample: {ours:.2f}x"
                 + (f", demo accuracy equal or better: {t['demo_accuracy_equal_or_better']}"
                    if with_demo else " (accuracy not run: --no-demo)")
                 + f" -> {'met' if t['met'] else 'NOT met'}")
    config = {"mode": opts.mode, "reps": opts.reps, "demo": with_demo, **vars(s)}
    return common.emit("train_step", config, results,
                       ["variant", "tokens/img", "s/step", "samples/s", "visual tok/s",
                        "text tok/s", "x vs original"], rows, notes, opts.quiet)


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--no-demo", action="store_true", help="step speed only, no demo training")
    p.add_argument("--profile", action="store_true",
                   help="also torch.profiler one step per variant (self CPU time per op)")
    args = p.parse_args(argv)
    return run(common.options(args), with_demo=not args.no_demo, profile=args.profile)


if __name__ == "__main__":
    main()
