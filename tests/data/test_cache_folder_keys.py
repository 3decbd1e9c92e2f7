"""A frame folder's identity (what the cache key hashes) keeps os.walk's semantics."""

import os

from umbrella.data.cache import cache_key, source_identity


def _tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("frame_0.pt", "frame_1.pt", ".dot", "a/f", "a/b/g", "a/.h", ".hidden/x"):
        (root / name).write_text(name)
    os.symlink(root / "a", root / "linked_dir")
    os.symlink(root / "frame_0.pt", root / "linked_file")
    return root


def test_folder_identity_lists_visible_files_recursively(tmp_path):
    root = _tree(tmp_path / "run")
    files = source_identity(root)["files"]
    assert [f[0] for f in files] == ["a/b/g", "a/f", "frame_0.pt", "frame_1.pt", "linked_file"]
    assert files[2][1] == len("frame_0.pt") and files[4][1] == len("frame_0.pt")


def test_touching_a_frame_changes_the_key(tmp_path):
    root = _tree(tmp_path / "run")
    before = cache_key(root, "rsfMRI", {"a": 1})
    assert cache_key(root, "rsfMRI", {"a": 1}) == before
    (root / "a" / "b" / "g").write_text("changed content")
    assert cache_key(root, "rsfMRI", {"a": 1}) != before
