"""Run under `torchrun --nproc_per_node 2`: one DDP step where rank 0 holds a T1 batch and rank 1 an
rsfMRI batch, while the dMRI embedding is idle on both. Writes the embedding gradients after the
all-reduce and the dMRI weights before/after an AdamW step (weight decay on) to OUT/rank<k>.pt.

With `--reference`, runs single-process over the same global batch (both halves) instead.
With `--conv`, every modality uses the convolutional stem (model.patch_embed=conv), with `--pooled`
its BatchNorm / max-pool stages (model.stem_style=pooled); with `--connectivity`, rsfMRI uses the connectivity embedding (model.rsfmri_embed=connectivity).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from umbrella.config import ModelConfig
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.model.build import build_brain_llava
from umbrella.training.launch import finish_worker
from umbrella.training.trainer import modality_parameters, release_idle_grads, unified_loss

GEOM = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]},
        "rsfMRI": {"image_size": [16, 16, 16, 4], "patch_size": [8, 8, 8, 4]},
        "dMRI": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}}


def half_batch(modality: str, encoder: PromptEncoder, gen: torch.Generator) -> dict:
    """Two samples of one modality, answers male/female."""
    shape = (2, 1, *GEOM[modality]["image_size"])
    ids, labels = [], []
    for answer in ("male", "female"):
        enc = encoder.encode([Turn("user", "<image>\nWhat is the sex?"), Turn("assistant", answer)],
                             [8])
        ids.append(enc.input_ids)
        labels.append(enc.labels)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(2, len(ids[0]), dtype=torch.long),
            "labels": torch.tensor(labels), "pixel_values": {modality: torch.randn(shape, generator=gen)},
            "image_order": [(modality, 0), (modality, 1)]}


def setup(conv: bool = False, connectivity: bool = False, pooled: bool = False):
    torch.manual_seed(0)
    tok = train_tokenizer(["What is the sex? male female"] * 4, 280)
    embed = {"patch_embed": "conv", "stem_channels": [4, 8, 8]} if conv else {}
    if pooled:
        embed["stem_style"] = "pooled"
    if connectivity:
        embed["rsfmri_embed"] = "connectivity"
    model = build_brain_llava(ModelConfig(vision_hidden_size=32, text_hidden_size=32, **embed), GEOM,
                              tok, seed=0)
    gen = torch.Generator().manual_seed(1)
    enc = PromptEncoder(tok)
    return model.train(), [half_batch("T1", enc, gen), half_batch("rsfMRI", enc, gen)]


def step(model, params_owner, loss_fn):
    opt = torch.optim.AdamW(params_owner.parameters(), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in params_owner.named_parameters() if ".dMRI." in n}
    loss_fn().backward()
    grads = {m: [p.grad.clone() if p.grad is not None else None for p in ps]
             for m, ps in modality_parameters(params_owner).items()}
    release_idle_grads(params_owner)
    opt.step()
    after = {n: p.detach().clone() for n, p in params_owner.named_parameters() if ".dMRI." in n}
    return {"grads": grads, "dmri_before": before, "dmri_after": after}


def main(out: str, reference: bool, conv: bool = False, connectivity: bool = False,
         pooled: bool = False) -> None:
    model, halves = setup(conv, connectivity, pooled)
    if reference:
        result = step(model, model, lambda: sum(unified_loss(model, h)[0] for h in halves) / 2)
        torch.save(result, os.path.join(out, "reference.pt"))
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    result = step(ddp, model, lambda: unified_loss(ddp, halves[rank])[0])
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # barrier, destroy the group, exit work, os._exit: the ordinary interpreter exit can abort
    # a rank after a finished gloo run (umbrella.training.launch explains the race)
    finish_worker()


if __name__ == "__main__":
    main(sys.argv[1], "--reference" in sys.argv, "--conv" in sys.argv,
         "--connectivity" in sys.argv, "--pooled" in sys.argv)
