"""embedding_cache: a VLM training step over a frozen pretrained stem, with and without
model.embedding_cache_mb.

The second stage of benchmarks.learning: the tiny preset on 48 x 64 x 48 T1 volumes (patch 16,
36 tokens), the pooled convolutional stem [8, 16, 32, 64] and the encoder layers frozen
(``model.train_embeddings=frozen``, ``model.train_vision=frozen``), projector and language model
trained (forward + backward + clip + AdamW, the sex task's prompt, batch 16). Three models built
alike from the same seed, timed interleaved:

    no cache     model.embedding_cache_mb=0: the stem runs on every image of every step
    cached       each step's 16 images drawn from a pool of 64 with random left-right flips, as
                 the training split repeats over epochs: after the first pass every image and
                 flipped copy is in the cache
    all misses   the cache on, every image new (e.g. rotations drawn afresh per step): the cost of
                 hashing and storing when nothing is ever read back

Figures: median seconds per step over repetitions; the ratios are "no cache" over each variant.

Usage: python -m benchmarks.embedding_cache [--quick | --smoke] [--reps N] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

POOL = 64  # distinct images the cached variant draws from


def build(encoder, shape: tuple[int, ...], patch: int, megabytes: int):
    """The tiny preset over a pooled stem, tower frozen, with the embedding cache of ``megabytes``."""
    from umbrella.config import ModelConfig
    from umbrella.model.build import build_brain_llava
    from umbrella.model.modeling_brain_vit import enable_output_cache
    from umbrella.model.trainable import apply_trainable_policy

    cfg = ModelConfig(patch_embed="conv", stem_style="pooled", stem_channels=[8, 16, 32, 64],
                      center_inputs=False)
    geom = {"T1": {"image_size": list(shape), "patch_size": [patch] * 3}}
    model = build_brain_llava(cfg, geom, encoder.tok, seed=0)
    apply_trainable_policy(model, embeddings="frozen", vision="frozen")
    enable_output_cache(model, megabytes)
    return model.train()


def batches(encoder, shape: tuple[int, ...], tokens: int, batch: int, fresh: bool):
    """i -> a collated batch: images drawn from the pool with random flips, or all new ones."""
    import torch

    from umbrella.data.collate import BrainCollator

    gen = torch.Generator().manual_seed(1)
    pool = torch.randn((POOL, 1, *shape), generator=gen)
    samples = common.make_samples(encoder, "T1", shape, batch, tokens=tokens)
    collate = BrainCollator(encoder.tok.pad_token_id, pad_to_multiple_of=8)

    def make(i: int) -> dict:
        pick = torch.Generator().manual_seed(1000 + i)
        for j, s in enumerate(samples):
            image = pool[int(torch.randint(POOL, (1,), generator=pick))]
            if torch.rand((), generator=pick) < 0.5:
                image = image.flip(-1)
            if fresh:  # an image never seen before, at the cost of one addition
                image = image + (i * len(samples) + j + 1) * 1e-3
            s["images"] = [("T1", image.contiguous())]
        return collate(samples)
    return make


def main(argv=None) -> dict:
    import torch

    from benchmarks.train_step import optimizer, train_step
    from umbrella.model.modeling_brain_vit import output_cache_counts

    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    opts = common.options(args)
    common.setup(opts.threads)
    shape, patch, batch, calls = {"smoke": ((16, 16, 16), 8, 2, 1), "quick": ((48, 64, 48), 16, 16, 4),
                                  "full": ((48, 64, 48), 16, 16, 8)}[opts.mode]
    tokens = (shape[0] // patch) * (shape[1] // patch) * (shape[2] // patch)
    encoder = common.prompt_encoder()
    setups = {"no cache": (0, False), "cached": (1024, False), "all misses": (1024, True)}
    models, steps = {}, {}
    for name, (megabytes, fresh) in setups.items():
        model = build(encoder, shape, patch, megabytes)
        opt, _ = optimizer(model, 10**6, 0)
        make = batches(encoder, shape, tokens, batch, fresh)
        models[name] = model
        steps[name] = (lambda i, m=model, o=opt, mk=make: train_step(m, o, mk(i)))
    if opts.mode != "smoke":  # every pooled image and flipped copy seen once before timing
        for i in range(2 * POOL // batch + 4):
            steps["cached"](10**6 + i)
    times = common.time_interleaved(steps, opts.reps, calls)
    sums = {n: common.summary(t) for n, t in times.items()}
    base = sums["no cache"]["median_s"]
    ratios = {n: base / s["median_s"] for n, s in sums.items()}
    counts = {n: output_cache_counts(m) for n, m in models.items()}
    results = {"steps": sums, "ratio_vs_no_cache": ratios, "cache_counts": counts,
               "threads": torch.get_num_threads(),
               "targets": {"cached_at_least_1.5x_faster": {"value": ratios["cached"],
                                                           "met": ratios["cached"] >= 1.5},
                           "all_misses_within_10pc": {"value": ratios["all misses"],
                                                      "met": ratios["all misses"] >= 0.9}}}
    rows = [[n, f"{s['median_s'] * 1000:.0f} ms", f"{ratios[n]:.2f}x",
             f"{counts[n]['hits']} / {counts[n]['misses']}"] for n, s in sums.items()]
    notes = [f"batch {batch}, {'x'.join(map(str, shape))} voxels, {tokens} tokens, tiny preset, "
             f"tower frozen; reps={opts.reps}, {calls} steps per rep, {opts.threads} threads"]
    return common.emit("embedding_cache", {"mode": opts.mode, "reps": opts.reps, "batch": batch,
                                           "shape": shape, "pool": POOL}, results,
                       ["variant", "step", "speed vs no cache", "cache hits / misses"], rows,
                       notes, quiet=opts.quiet)


if __name__ == "__main__":
    main()
