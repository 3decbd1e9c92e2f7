"""benchmarks.scale and benchmarks.gpu_mfu in their smoke configurations (no timing asserts):
the scale run's stages see every subject, and the MFU script's FLOPs follow the model's shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_mfu, scale  # noqa: E402


def _json_line(capsys) -> dict:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_scale_smoke_counts_every_record_at_both_scales(capsys):
    out = scale.main(["--smoke", "--subjects", "40,80", "--quiet", "--threads", "1"])
    assert _json_line(capsys)["benchmark"] == "scale"
    stages = out["results"]["stages"]
    for n in (40, 80):
        s = stages[str(n)]
        n_fmri = len(range(0, n, scale.FMRI_EVERY))
        assert s["validate"]["records"] == n + n_fmri and s["validate"]["problems"] == 0
        assert f"T1 0/{n} ready" in s["cache_index"]["line"]
        assert s["sampler_epoch"]["samples"] == s["dataset_start"]["items"]
        assert len(s["sampler_epoch"]["epochs_s"]) == scale.SAMPLER_EPOCHS
        assert all(s[k]["peak_rss_mib"] > 0 for k in scale.STAGES)
        assert all(len(s[k]["repeats_s"]) == 1 for k in scale.STAGES)  # smoke: one run each
    assert set(out["results"]["time_ratio"]) == set(scale.STAGES)
    frame_checks = {"frame_loader_memory_flat_within_8mib", "frame_dataset_start_flat_within_2x"}
    assert set(out["results"]["checks"]) == {f"{k}_within_2.4x" for k in scale.STAGES} | frame_checks
    frames = out["results"]["frame_folders"]
    assert frames["frames"] == [20, 40] and frames["runs"] == 6
    for f in ("20", "40"):
        s = frames["stages"][f]
        assert "rsfMRI 0/6 ready" in s["frame_identity"]["line"]
        assert s["frame_dataset_start"]["items"] == 6 and s["frame_cache_build"]["built"] == 6
        assert s["frame_loader_epoch"]["samples"] == 6
        assert s["frame_loader_epoch"]["rss_growth_mib"] >= 0
    assert set(frames["time_ratio"]) == set(scale.FRAME_STAGES)


def test_scale_frames_can_be_skipped_and_cheap_stages_repeated(capsys):
    out = scale.main(["--smoke", "--subjects", "16,32", "--frames", "", "--quiet",
                      "--threads", "1", "--reps", "2"])
    assert "frame_folders" not in out["results"]
    assert not any(k.startswith("frame_") for k in out["results"]["checks"])
    assert out["config"]["repeat"] == 2
    for n in ("16", "32"):
        for stage, s in out["results"]["stages"][n].items():
            if stage == "build_cohort_s":
                continue
            runs = 2 if stage in scale.REPEATED else 1
            assert len(s["repeats_s"]) == len(s["repeats_peak_rss_mib"]) == runs
            assert s["seconds"] == pytest.approx(sum(s["repeats_s"]) / runs)  # median of 1 or 2
    assert "validate" not in scale.REPEATED and "dataset_start" in scale.REPEATED


def test_flops_per_sample_counts_every_linear_layer():
    from umbrella.config import ModelConfig
    from umbrella.data.tokenizer import train_tokenizer
    from umbrella.model.build import build_brain_llava

    tok = train_tokenizer(["male female sex"] * 4, 300)
    geom = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}}
    model = build_brain_llava(ModelConfig(), geom, tok, seed=0)  # tiny: LM 128 x 2, tower 64 x 2
    lm_linear = 2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 512)
    # per LM layer: q, o (128x128), k, v (128x64: 2 KV heads of 32), gate/up/down (128x512)
    assert gpu_mfu.linear_params(model.model.language_model.layers) == lm_linear
    seq, img = 40, 8
    flops = gpu_mfu.flops_per_sample(model, seq, img)
    head = model.lm_head.weight.numel()
    tower = gpu_mfu.linear_params(model.model.vision_tower)
    proj = gpu_mfu.linear_params(model.model.multi_modal_projector)
    expected = 3 * (seq * (2 * (lm_linear + head) + 4 * 2 * 128 * seq)
                    + img * (2 * (tower + proj) + 4 * 2 * 64 * img))
    assert flops == expected
    assert gpu_mfu.peak_flops("NVIDIA H200", None) == 989e12
    assert gpu_mfu.peak_flops("Some GPU", 100.0) == 100e12
    assert gpu_mfu.peak_flops("Some GPU", None) is None


def test_gpu_mfu_smoke_reports_mfu_per_batch(capsys):
    out = gpu_mfu.main(["--smoke", "--quiet", "--threads", "1"])
    assert _json_line(capsys)["benchmark"] == "gpu_mfu"
    rows = out["results"]["batches"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["mfu"] == r["achieved_tflops"] / 1.0  # smoke peak: 1 TFLOP/s
        assert r["tokens_per_s"] == r["batch"] * r["seq_len"] / r["median_s"]
