import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from umbrella.errors import ConfigError, UmbrellaError, VolumeError
from umbrella.inference import (
    display_volume,
    interactive,
    orthogonal_slices,
    resolve_model_dir,
    show_slices,
)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])
                             if affine is None else affine), path)
    return path


def test_display_volume_is_ras_and_averages_time(tmp_path):
    rng = np.random.default_rng(0)
    series = rng.random((6, 7, 8, 5)).astype(np.float32)
    np.testing.assert_allclose(display_volume(_save(tmp_path / "bold.nii.gz", series)),
                               series.mean(axis=3), rtol=1e-6)
    vol = rng.random((6, 7, 8)).astype(np.float32)
    flipped = _save(tmp_path / "las.nii.gz", vol, np.diag([-2.0, 2.0, 2.0, 1.0]))
    np.testing.assert_allclose(display_volume(flipped), vol[::-1])  # LAS stored -> RAS shown
    with pytest.raises(VolumeError, match="not found"):
        display_volume(tmp_path / "missing.nii.gz")


def test_orthogonal_slices_are_the_central_planes():
    vol = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    s = orthogonal_slices(vol)
    np.testing.assert_array_equal(s["axial"], vol[:, :, 4].T)
    np.testing.assert_array_equal(s["coronal"], vol[:, 3, :].T)
    np.testing.assert_array_equal(s["sagittal"], vol[2, :, :].T)
    assert {k: v.shape for k, v in s.items()} == {"axial": (6, 4), "coronal": (8, 4),
                                                  "sagittal": (8, 6)}


def test_show_writes_one_row_per_input(tmp_path):
    rng = np.random.default_rng(1)
    t1 = _save(tmp_path / "t1.nii.gz", rng.random((16, 16, 16)))
    bold = _save(tmp_path / "bold.nii.gz", rng.random((12, 12, 12, 4)))
    one = show_slices([("T1", t1)], "<image>\nWhat is the sex?", "female", tmp_path / "one.png")
    two = show_slices([("T1", t1), ("rsfMRI", bold)], "Sex?", "male", tmp_path / "two.png")
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h1, w1 = mpimg.imread(one).shape[:2]
    h2, w2 = mpimg.imread(two).shape[:2]
    assert w1 == w2 == 1100 and h2 > 1.8 * h1 - 60  # 100 dpi, 11 in wide; 2.8 in per input row
    with pytest.raises(ConfigError, match="at least one image"):
        show_slices([], "q", "a", tmp_path / "none.png")


class _Stub:
    """Stands in for BrainAssistant: answers with the question's length."""

    def __init__(self):
        self.loaded, self.asked = 0, []

    def load_images(self, images):
        self.loaded += 1

    def ask(self, question, images, max_new_tokens=32):
        if "fail" in question:
            raise ConfigError("the question has 2 <image> placeholders but 1 images were given")
        self.asked.append(question)
        return str(len(question))

    def show(self, question, images, answer, out_png):
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(b"png")
        return out_png


def test_interactive_until_empty_line_keeps_going_after_errors(tmp_path):
    stub, printed = _Stub(), []
    lines = iter(["first question", "please fail", "  second  ", "", "never asked"])
    out = interactive(stub, [("T1", "x.nii.gz")], input_fn=lambda prompt: next(lines),
                      print_fn=printed.append, show_dir=tmp_path / "figs")
    assert out == [("first question", "14"), ("second", "6")]
    assert printed[0] == "14" and printed[2].startswith("error: invalid configuration")
    assert stub.loaded == 1 and stub.asked == ["first question", "second"]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["answer_01.png",
                                                                      "answer_02.png"]


def test_interactive_stops_at_eof():
    def eof(prompt):
        raise EOFError

    assert interactive(_Stub(), [], input_fn=eof, print_fn=print) == []


def test_resolve_model_dir_names_the_fix(tmp_path):
    with pytest.raises(UmbrellaError, match="run folder"):
        resolve_model_dir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path) == tmp_path / "model"
