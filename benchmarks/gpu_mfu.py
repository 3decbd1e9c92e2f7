"""gpu_mfu: the 0.5B-class preset on one GPU: tokens/s, samples/s, peak memory and model FLOPs
utilisation (MFU) per batch size, up to the largest batch that fits.

One training step = forward + backward + grad clip + fused AdamW (float32 master weights), bf16
autocast, SDPA attention, optionally gradient checkpointing (``--checkpointing``), on the sex
task's prompt with one random T1 of 96³ / patch 16 (216 visual tokens) per sample.

MFU = model FLOPs per step / step seconds / the GPU's peak dense bf16 FLOP/s. Model FLOPs count
the matmuls of one forward and backward (3 x forward; recomputation by checkpointing is not
counted, as is usual), per token 2 x parameters of every linear layer it passes plus attention
scores and values (2 x 2 x layers x hidden x sequence length per token, forward), for the LM
(every token, the output layer included) and the tower (the visual tokens; patch embedding and
projector included). Peak dense bf16: H100 / H200 989 TFLOP/s, A100 312, L40S 362 (``--peak``
for any other GPU).

Usage: python -m benchmarks.gpu_mfu [--batches 1,2,4,...] [--checkpointing] [--peak TFLOPS]
       python -m benchmarks.gpu_mfu --smoke   # CPU, tiny preset: checks the script, measures nothing
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, train_step  # noqa: E402
from benchmarks.train_step import Variant  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def linear_params(module) -> int:
    """Weights of every Linear / Conv layer in ``module`` (biases and norms excluded)."""
    import torch

    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))


def flops_per_sample(model, seq_len: int, image_tokens: int) -> float:
    """Model FLOPs (forward + backward = 3 x forward) of one sample: ``seq_len`` LM tokens of which
    ``image_tokens`` come from one image through the tower and projector."""
    text, vision = model.config.text_config, model.config.vision_config
    lm = model.model.language_model
    lm_linear = linear_params(lm.layers) + model.lm_head.weight.numel()
    lm_attn = 2 * 2 * text.num_hidden_layers * text.hidden_size * seq_len
    tower = model.model.vision_tower
    tower_linear = linear_params(tower) + linear_params(model.model.multi_modal_projector)
    tower_attn = 2 * 2 * vision.num_hidden_layers * vision.hidden_size * image_tokens
    forward = seq_len * (2 * lm_linear + lm_attn) + image_tokens * (2 * tower_linear + tower_attn)
    return 3.0 * forward


def peak_flops(device_name: str, given: float | None) -> float | None:
    if given:
        return given * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def measure(model, encoder, variant: Variant, batch: int, device, steps: int, bf16: bool) -> dict:
    import contextlib

    import torch

    from umbrella.model.build import tokens_per_image

    tokens = tokens_per_image(model, variant.modality)
    host = train_step.random_batch(variant, encoder, tokens, batch)
    inputs = {k: host[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    inputs["pixel_values"] = {m: v.to(device) for m, v in host["pixel_values"].items()}
    inputs["image_order"] = host["image_order"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    cuda = device.type == "cuda"

    def step():
        with ctx():
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    secs = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
    seq = int(inputs["input_ids"].shape[1])
    med = common.median(secs)
    flops = batch * flops_per_sample(model, seq, tokens)
    return {"batch": batch, "seq_len": seq, "image_tokens": tokens, "median_s": med,
            "samples_per_s": batch / med, "tokens_per_s": batch * seq / med,
            "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / med / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "loss": float(loss.detach())}


def main(argv=None) -> dict:
    import torch

    from umbrella.config import ModelConfig
    from umbrella.model.build import build_brain_llava

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128", help="batch sizes to try")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--peak", type=float, default=None, help="peak dense bf16 TFLOP/s of the GPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    args = p.parse_args(argv)
    opts = common.options(args)
    common.setup(opts.threads)
    smoke = opts.mode == "smoke"
    device = common.cuda_device("gpu_mfu", smoke)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_flops(name, args.peak) or (1e12 if smoke else None)
    if peak is None:
        raise SystemExit(f"unknown peak bf16 FLOP/s for {name!r}: pass --peak TFLOPS")
    preset, variant = ("tiny", Variant("T1", "T1", (16,) * 3, (8,) * 3)) if smoke else \
        ("0.5b", Variant("T1", "T1", (96,) * 3, (16,) * 3))
    encoder = common.prompt_encoder()
    geom = {"T1": {"image_size": list(variant.image_size), "patch_size": list(variant.patch_size)}}
    model = build_brain_llava(ModelConfig(preset=preset), geom, encoder.tok, seed=0).to(device)
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = [1, 2] if smoke else [int(b) for b in args.batches.split(",")]
    steps = 1 if smoke else args.steps
    results = []
    for batch in batches:
        try:
            r = measure(model, encoder, variant, batch, device, steps, bf16=cuda)
        except torch.OutOfMemoryError:
            results.append({"batch": batch, "oom": True})
            break
        finally:
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
        r["mfu"] = r["achieved_tflops"] * 1e12 / peak
        results.append(r)
    done = [r for r in results if not r.get("oom")]
    best = max(done, key=lambda r: r["mfu"])
    targets = {"mfu_at_best_batch": {"value": best["mfu"], "met": best["mfu"] >= 0.40}}
    rows = [[r["batch"], r["seq_len"], r["median_s"] * 1e3, r["samples_per_s"], r["tokens_per_s"],
             r["achieved_tflops"], r["mfu"], r["peak_gib"] if r["peak_gib"] is not None else "-"]
            for r in done]
    params = sum(p.numel() for p in model.parameters())
    config = {"mode": opts.mode, "preset": preset, "params": params, "device": name,
              "peak_bf16_tflops": peak / 1e12, "checkpointing": args.checkpointing,
              "precision": "bf16 autocast, fp32 master weights" if cuda else "fp32",
              "image": f"{variant.image_size} / patch {variant.patch_size}", "steps": steps}
    notes = [f"MFU target >= 0.40 at the best batch: {best['mfu']:.3f} at batch {best['batch']}"]
    if len(done) < len(results):
        notes.append(f"batch {results[-1]['batch']}: out of memory")
    if smoke:
        notes = ["smoke mode: tiny preset on CPU, peak set to 1 TFLOP/s, nothing measured"]
    return common.emit("gpu_mfu", config, {"batches": results, "targets": targets},
                       ["batch", "seq", "ms/step", "samples/s", "tokens/s", "TFLOP/s", "MFU",
                        "peak GiB"], rows, notes, opts.quiet)


if __name__ == "__main__":
    main()
