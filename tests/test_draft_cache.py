"""The resident draft copy (runtime.draft_cache): staged once, found by content, and how it is copied."""

import pytest

from lumen.runtime import draft_cache


def test_staged_copy_is_found_and_follows_content(tmp_path):
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "model.safetensors").write_bytes(b"x" * 1024)
    (draft / "config.json").write_text("{}")
    root = tmp_path / "shm"
    assert draft_cache.resident_copy(draft, root) is None
    copy = draft_cache.stage(draft, root)
    assert copy is not None and draft_cache.resident_copy(draft, root) == copy
    assert (copy / "model.safetensors").read_bytes() == b"x" * 1024
    (draft / "model.safetensors").write_bytes(b"y" * 2048)  # new weights: the old copy is not theirs
    assert draft_cache.resident_copy(draft, root) is None


@pytest.mark.parametrize("value, pinned", [("", None), ("auto", None), ("0", False), ("off", False),
                                           ("1", True), ("on", True)])
def test_pin_setting(monkeypatch, value, pinned):
    monkeypatch.setenv(draft_cache.PIN_ENV, value)
    assert draft_cache.pin_resident() is pinned
