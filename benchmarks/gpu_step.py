"""gpu_step: one training step of the tiny preset on a CUDA device, per modality, token budget and
precision, with the GPU memory of one step.

Variants (forward + backward + grad clip + AdamW, random images, the real prompt of the sex task):

    T1 96³ / patch 16          216 tokens   fp32 and bf16 autocast
    rsfMRI 96³x20 / 16³x20     216 tokens   fp32 and bf16 autocast
    dMRI 96³ / patch 16        216 tokens   fp32 and bf16 autocast
    T1 120³ / patch 10        1728 tokens   fp32 and bf16 autocast (the original UMBRELLA budget)
    rsfMRI bf16, via float32   the patch embedding's old cast (float16 batch -> float32 -> bf16),
                               the same-run baseline of the direct float16 -> bf16 cast

Images reach the device as the collator gives them on CUDA (float16, pinned) and are copied
inside the timed step, so the figure includes the host-to-device transfer. Each figure is the
median over repetitions of ``calls`` steps, between torch.cuda.synchronize() calls; the variants
are timed interleaved. Ratios: bf16 against fp32 of the same variant, and samples/s of each
variant against the original budget at the same precision.

Usage: python -m benchmarks.gpu_step [--quick | --smoke] [--reps N] [--batch B]
Needs a CUDA device (``--smoke`` also runs on CPU, fp32 only, to check the script).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, train_step  # noqa: E402
from benchmarks.train_step import Variant  # noqa: E402


def variants(smoke: bool) -> list[Variant]:
    side, patch, orig, orig_patch, frames = (16, 8, 20, 5, 2) if smoke else (96, 16, 120, 10, 20)
    ours = (side,) * 3
    return [Variant("T1", "T1", ours, (patch,) * 3),
            Variant("rsfMRI", "rsfMRI", (*ours, frames), (patch,) * 3 + (frames,)),
            Variant("dMRI", "dMRI", ours, (patch,) * 3),
            Variant("T1 original budget", "T1", (orig,) * 3, (orig_patch,) * 3)]


def _to(batch: dict, device) -> dict:
    out = {}
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = batch[k].to(device, non_blocking=True)
    out["pixel_values"] = {m: v.to(device, non_blocking=True)
                           for m, v in batch["pixel_values"].items()}
    out["image_order"] = batch["image_order"]
    return out


def _float32_detour():
    """The patch embedding as it was: cast to the weights' dtype (float32) whatever autocast does."""
    from unittest import mock

    from umbrella.model.modeling_brain_vit import BrainPatchEmbedding

    return mock.patch.object(BrainPatchEmbedding, "_compute_dtype",
                             lambda self, pixel_values: self.proj.weight.dtype)


def step_fn(model, opt, host_batch: dict, device, precision: str, detour: bool = False):
    import torch

    def step(_i: int) -> float:
        batch = _to(host_batch, device)
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
               else contextlib.nullcontext())
        with ctx, (_float32_detour() if detour else contextlib.nullcontext()):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def run(opts: common.Options, batch: int) -> dict:
    import torch

    from umbrella.model.build import tokens_per_image

    common.setup(opts.threads)
    smoke = opts.mode == "smoke"
    device = common.cuda_device("gpu_step", smoke)
    cuda = device.type == "cuda"
    precisions = ("fp32", "bf16") if cuda else ("fp32",)
    calls = 1 if smoke else (5 if opts.mode == "quick" else 10)
    batch = 2 if smoke else batch
    encoder = common.prompt_encoder()
    fns, setups, peaks = {}, {}, {}
    runs = [(v, p, False) for v in variants(smoke) for p in precisions]
    if cuda:
        runs.append((variants(smoke)[1], "bf16", True))
    for v, p, detour in runs:
        model = train_step.build_model(v, encoder).to(device).train()
        tokens = tokens_per_image(model, v.modality)
        host = train_step.random_batch(v, encoder, tokens, batch)
        if cuda:  # as the collator hands it over on CUDA: float16, pinned
            host["pixel_values"] = {m: t.half().pin_memory()
                                    for m, t in host["pixel_values"].items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        name = f"{v.name} {p}" + (", via float32" if detour else "")
        fns[name] = step_fn(model, opt, host, device, p, detour)
        setups[name] = (v, p, tokens)
        if cuda:  # memory one step needs above what is resident (all models built so far)
            fns[name](0)
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fns[name](0)
            peaks[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    times = common.time_interleaved(fns, opts.reps, calls, warmup=1)
    results = {}
    for name, secs in times.items():
        v, p, tokens = setups[name]
        med = common.median(secs)
        results[name] = {**common.summary(secs), "modality": v.modality, "precision": p,
                         "tokens_per_image": tokens, "batch": batch,
                         "samples_per_s": batch / med, "step_gib": peaks.get(name)}
    for name, r in results.items():
        base = results[f"T1 original budget {r['precision']}"]
        r["x_vs_original_budget"] = r["samples_per_s"] / base["samples_per_s"]
        fp32 = results.get(f"{name.split(' ' + r['precision'])[0]} fp32")
        r["x_vs_fp32"] = r["samples_per_s"] / fp32["samples_per_s"] if fp32 else None
    rows = [[n, r["tokens_per_image"], r["median_s"] * 1e3, r["samples_per_s"],
             r["x_vs_fp32"] or 1.0, r["x_vs_original_budget"],
             r["step_gib"] if r["step_gib"] is not None else "-"] for n, r in results.items()]
    notes = [f"batch {batch}, tiny preset, {calls} steps per repetition, reps={opts.reps}, median;"
             " host-to-device copy of the batch inside each step" if not smoke
             else "smoke mode: tiny shapes, nothing measured",
             "step GiB: peak GPU memory of one step above the memory resident before it"]
    ratios = {}
    if "rsfMRI bf16, via float32" in results:
        ratio = (results["rsfMRI bf16"]["samples_per_s"]
                 / results["rsfMRI bf16, via float32"]["samples_per_s"])
        ratios["rsfmri_bf16_direct_cast_vs_float32_detour"] = ratio
        notes.append(f"rsfMRI bf16: direct float16 -> bf16 cast in the patch embedding is "
                     f"{ratio:.2f}x the speed of the float32 detour")
    config = {"mode": opts.mode, "reps": opts.reps, "batch": batch, "calls": calls,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    return common.emit("gpu_step", config, {"step": results, "ratios": ratios},
                       ["variant", "tokens/img", "ms/step", "samples/s", "x vs fp32",
                        "x vs original", "step GiB"], rows, notes, opts.quiet)


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="samples per step (default 32)")
    args = p.parse_args(argv)
    return run(common.options(args), args.batch)


if __name__ == "__main__":
    main()
