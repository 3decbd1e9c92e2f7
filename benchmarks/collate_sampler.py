"""collate_sampler: what the collator and the batch sampler cost per batch, next to a train step.

Collate (batch of 8, in this process), timed interleaved against:
    reference          the collator before this change (torch.stack per modality), same samples
    limit              a plain numpy copy of the batch's image bytes into a fresh array
and, for scale, a training step of the tiny preset on the same batch (benchmarks.train_step).
Samples as float32 (rsfMRI (1, D, H, W, T) contiguous, the dataset's earlier form) and as the
dataset gives them now (rsfMRI float16 in stored (T, D, H, W) order, cast to float32 by the
collator's copy).

Batch assembly, from a cached run (float16 .npy, memory-mapped) to a collated batch of 8 rsfMRI
windows: the earlier path (take_window: transposing float32 copy, then the stack) vs the
dataset's path now (dataset.window_tensor: a float16 copy of the window in stored order, then one
stack that casts to float32, or keeps float16 for a GPU to cast), against a numpy copy of the
windows' bytes.

Through a DataLoader with 2 workers (samples prebuilt in memory, so only collate and the transfer
to the main process are measured): batches/s with the reference collator vs BrainCollator, which
stacks straight into shared memory.

Sampler: ModalityBatchSampler over 10,000 items in 3 modality groups (batch 8), per mixing
policy, against torch's BatchSampler(RandomSampler) over the same items.

Usage: python -m benchmarks.collate_sampler [--quick | --smoke] [--reps N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    side: int
    frames: int
    batch: int
    calls: int
    loader_batches: int
    sampler_items: int


SIZES = {"full": Sizes(96, 20, 8, 5, 12, 10_000), "quick": Sizes(96, 20, 8, 3, 8, 10_000),
         "smoke": Sizes(16, 4, 2, 1, 3, 300)}


class ReferenceCollator:
    """The collator as it was before this change (torch.stack), kept to measure against."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def _pad(self, seqs, value, length):
        import torch

        out = torch.full((len(seqs), length), value, dtype=torch.long)
        for row, seq in enumerate(seqs):
            out[row, :len(seq)] = seq
        return out

    def __call__(self, samples):
        import torch

        from umbrella.data.prompts import IGNORE_INDEX

        length = max(len(s["input_ids"]) for s in samples)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        stacks, order = {}, []
        for s in samples:
            for modality, tensor in s["images"]:
                stacks.setdefault(modality, []).append(tensor)
                order.append((modality, len(stacks[modality]) - 1))
        return {"input_ids": self._pad([s["input_ids"] for s in samples], self.pad_token_id, length),
                "attention_mask": self._pad([s["attention_mask"] for s in samples], 0, length),
                "pixel_values": {m: torch.stack(v) for m, v in stacks.items()},
                "image_order": order, "ids": [s["id"] for s in samples],
                "labels": self._pad([s["labels"] for s in samples], IGNORE_INDEX, length)}


def _bound(collator, samples):
    return lambda i: collator(samples)


def _limit(samples):
    arrays = [s["images"][0][1].numpy() for s in samples]
    return lambda i: np.array(arrays)


def collate_speed(s: Sizes, reps: int, encoder) -> tuple[dict, dict]:
    """µs per batch of each collate variant, per sample set; and the equality checks."""
    import torch

    from umbrella.data.collate import BrainCollator

    pad = encoder.tok.pad_token_id
    ref, new = ReferenceCollator(pad), BrainCollator(pad, pad_to_multiple_of=8)
    to32 = BrainCollator(pad, pad_to_multiple_of=8, image_dtype=torch.float32)
    spatial, window = (s.side,) * 3, (s.side,) * 3 + (s.frames,)
    sets = {
        "T1 float32": common.make_samples(encoder, "T1", spatial, s.batch),
        "rsfMRI float32 (D,H,W,T)": common.make_samples(encoder, "rsfMRI", window, s.batch),
        "rsfMRI float16 stored order": common.make_samples(encoder, "rsfMRI", window, s.batch,
                                                    stored_order=True, dtype=torch.float16),
    }
    variants, checks = {}, {}
    for name, samples in sets.items():
        variants[f"{name} | reference"] = _bound(ref, samples)
        collators = {"BrainCollator": new}
        if "float16" in name:
            collators["BrainCollator -> float32"] = to32
        for label, c in collators.items():
            variants[f"{name} | {label}"] = _bound(c, samples)
        variants[f"{name} | limit: numpy copy"] = _limit(samples)
        a, b = ref(samples), new(samples)
        m = samples[0]["images"][0][0]
        checks[name] = bool(torch.equal(a["pixel_values"][m], b["pixel_values"][m])
                            and torch.equal(a["input_ids"], b["input_ids"])
                            and torch.equal(a["labels"], b["labels"]))
    times = common.time_interleaved(variants, reps, s.calls)
    return times, checks


EARLIER = "earlier: take_window f32 + BrainCollator"


def assembly_speed(s: Sizes, reps: int, encoder, root: Path) -> tuple[dict, bool]:
    """Seconds per batch from the cached run to pixel_values, earlier vs current data path."""
    import torch

    from umbrella.data.collate import BrainCollator
    from umbrella.data.dataset import window_tensor
    from umbrella.data.fmri import FmriSpec, take_window

    spec = FmriSpec(image_size=(s.side,) * 3, sequence_length=s.frames)
    run = np.random.default_rng(0).standard_normal((3 * s.frames, *spec.image_size),
                                                   dtype=np.float32).astype(np.float16)
    path = root / "run.npy"
    np.save(path, run)
    starts = list(range(0, 2 * s.frames + 1))
    text = common.make_samples(encoder, "rsfMRI", (1, 1, 1, 1), s.batch)
    pad = encoder.tok.pad_token_id
    new = BrainCollator(pad, pad_to_multiple_of=8)
    to32 = BrainCollator(pad, pad_to_multiple_of=8, image_dtype=torch.float32)

    def windows(i):
        return [starts[(i * s.batch + k) * 7 % len(starts)] for k in range(s.batch)]

    def batch(images, collator):
        return collator([{**t, "images": [("rsfMRI", im)]} for t, im in zip(text, images,
                                                                             strict=True)])

    def earlier(i):  # InstructionDataset._image before window_tensor, then the collator
        return batch([torch.from_numpy(np.ascontiguousarray(
            take_window(np.load(path, mmap_mode="r"), t0, spec), dtype=np.float32))[None]
            for t0 in windows(i)], new)

    def dataset(collator):  # InstructionDataset._image now, then the collator
        def run_(i):
            mm = np.load(path, mmap_mode="r")
            return batch([window_tensor(mm, t0, spec) for t0 in windows(i)], collator)
        return run_

    def limit(i):
        mm = np.load(path, mmap_mode="r")
        return [np.array(mm[t0:t0 + s.frames]) for t0 in windows(i)]

    same = bool(torch.equal(earlier(3)["pixel_values"]["rsfMRI"],
                            dataset(to32)(3)["pixel_values"]["rsfMRI"]))
    fns = {EARLIER: earlier,
           "dataset: f16 window + BrainCollator(f32)": dataset(to32),
           "dataset: f16 window + BrainCollator (f16 batch)": dataset(new),
           "limit: numpy copy": limit}
    return common.time_interleaved(fns, reps, s.calls), same


# ------------------------------------------------------------------------------------ loader

class Prebuilt:
    """A map-style dataset that returns prebuilt samples (no reading, no copying)."""

    def __init__(self, samples: list[dict], length: int):
        self.samples, self.length = samples, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.samples[index % len(self.samples)]


def loader_speed(s: Sizes, reps: int, encoder) -> dict:
    """Seconds per batch received in the main process from 2 workers, per collator."""
    from torch.utils.data import DataLoader

    from umbrella.data.collate import BrainCollator

    pad = encoder.tok.pad_token_id
    window = (s.side,) * 3 + (s.frames,)
    samples = common.make_samples(encoder, "rsfMRI", window, s.batch)
    data = Prebuilt(samples, s.batch * s.loader_batches)

    def through(collator):
        def run(i):
            loader = DataLoader(data, batch_size=s.batch, num_workers=2, collate_fn=collator,
                                prefetch_factor=1)
            it = iter(loader)
            next(it)  # workers started and first batch in: time the steady state only
            start = time.perf_counter()
            n = sum(1 for _ in it)
            return (time.perf_counter() - start) / max(n, 1)
        return run

    out = {"reference": [], "BrainCollator": []}
    fns = {"reference": through(ReferenceCollator(pad)),
           "BrainCollator": through(BrainCollator(pad, pad_to_multiple_of=8))}
    for rep in range(reps + 1):
        for name in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            value = fns[name](rep)
            if rep:
                out[name].append(value)
    return out


# ------------------------------------------------------------------------------------ sampler

def sampler_speed(s: Sizes, reps: int) -> dict:
    """Seconds per batch of one epoch's iteration, per mixing policy and torch's baseline."""
    from torch.utils.data import BatchSampler, RandomSampler

    from umbrella.data.sampling import MIXING, ModalityBatchSampler

    n = s.sampler_items
    groups = ["T1"] * (n * 6 // 10) + ["rsfMRI"] * (n * 3 // 10)
    groups += ["dMRI"] * (n - len(groups))

    def epoch(make):
        def run(i):
            sampler = make()
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(i)
            return sum(1 for _ in sampler)
        return run

    fns = {f"ModalityBatchSampler {m}": epoch(lambda m=m: ModalityBatchSampler(groups, 8, mixing=m))
           for m in MIXING}
    fns["torch BatchSampler(RandomSampler)"] = epoch(
        lambda: BatchSampler(RandomSampler(range(n)), 8, drop_last=False))
    times = common.time_interleaved(fns, reps, 1)
    batches = -(-n // 8)
    return {k: [t / batches for t in v] for k, v in times.items()}


# ------------------------------------------------------------------------------------ report

def run(opts: common.Options) -> dict:
    common.setup(opts.threads)
    from benchmarks import train_step

    s = SIZES[opts.mode]
    encoder = common.prompt_encoder()
    ts = replace_sizes(train_step.SIZES[opts.mode], s)
    steps = train_step.step_speed(ts, opts.reps, [v for v in train_step.variants(ts)
                                                  if v.name in ("T1 (ours)", "rsfMRI")])
    step_s = {"T1": steps["T1 (ours)"]["median_s"], "rsfMRI": steps["rsfMRI"]["median_s"]}
    times, checks = collate_speed(s, opts.reps, encoder)
    with tempfile.TemporaryDirectory(prefix="umbrella-bench-collate-") as tmp:
        assembly, checks["assembly: dataset equals earlier"] = assembly_speed(
            s, opts.reps, encoder, Path(tmp))
    loader = loader_speed(s, opts.reps, encoder)
    sampler = sampler_speed(s, opts.reps)

    results, rows = {"train_step_s": step_s, "checks": checks}, []
    collate = {}
    for key, secs in times.items():
        name, variant = key.split(" | ")
        med = common.median(secs)
        ref = common.median(times[f"{name} | reference"])
        lim = common.median(times[f"{name} | limit: numpy copy"])
        step = step_s["T1" if name.startswith("T1") else "rsfMRI"]
        collate[key] = {**common.summary(secs), "us_per_batch": med * 1e6,
                        "speedup_vs_reference": ref / med, "times_the_limit": med / lim,
                        "fraction_of_train_step": med / step}
        rows.append([name, variant, med * 1e6, ref / med, med / lim, med / step])
    results["collate"] = collate
    results["assembly"] = {}
    cur = common.median(assembly[EARLIER])
    lim = common.median(assembly["limit: numpy copy"])
    for name, secs in assembly.items():
        med = common.median(secs)
        results["assembly"][name] = {**common.summary(secs), "speedup_vs_earlier": cur / med,
                                     "times_the_limit": med / lim,
                                     "fraction_of_train_step": med / step_s["rsfMRI"]}
        rows.append([f"{s.batch} rsfMRI windows from the cache", name, med * 1e6, cur / med,
                     med / lim, med / step_s["rsfMRI"]])
    ref_l, new_l = common.median(loader["reference"]), common.median(loader["BrainCollator"])
    results["loader_2_workers"] = {
        "reference_s_per_batch": ref_l, "brain_collator_s_per_batch": new_l,
        "speedup": ref_l / new_l, "raw": loader,
        "fraction_of_rsfmri_train_step": {"reference": ref_l / step_s["rsfMRI"],
                                          "BrainCollator": new_l / step_s["rsfMRI"]}}
    rows.append(["rsfMRI float32 via 2 workers", "reference", ref_l * 1e6, 1.0, "", ref_l / step_s["rsfMRI"]])
    rows.append(["rsfMRI float32 via 2 workers", "BrainCollator", new_l * 1e6, ref_l / new_l, "",
                 new_l / step_s["rsfMRI"]])
    base = common.median(sampler["torch BatchSampler(RandomSampler)"])
    results["sampler"] = {}
    for name, secs in sampler.items():
        med = common.median(secs)
        results["sampler"][name] = {**common.summary(secs), "us_per_batch": med * 1e6,
                                    "times_torch_batch_sampler": med / base,
                                    "fraction_of_t1_train_step": med / step_s["T1"]}
        rows.append([f"sampler, {s.sampler_items} items", name, med * 1e6, base / med, "",
                     med / step_s["T1"]])
    notes = [f"batch {s.batch}; T1 {s.side}³, rsfMRI {s.side}³x{s.frames}; reps={opts.reps}, median",
             f"train step (tiny preset, batch {ts.batch}): T1 {step_s['T1']:.3f} s, rsfMRI "
             f"{step_s['rsfMRI']:.3f} s",
             "x vs ref: reference time / this time (for the sampler: torch BatchSampler time / this)",
             f"checks (BrainCollator equals reference): {checks}"]
    return common.emit("collate_sampler", {"mode": opts.mode, "reps": opts.reps, **vars(s)},
                       results, ["batch of", "variant", "us/batch", "x vs ref", "x limit",
                                 "x train step"], rows, notes, opts.quiet)


def replace_sizes(ts, s: Sizes):
    from dataclasses import replace

    return replace(ts, batch=s.batch, side=s.side, frames=s.frames)


def main(argv=None) -> dict:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    return run(common.options(args))


if __name__ == "__main__":
    main()
