"""Data sources and deterministic sharding over data-parallel ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrain.launch.data import DataError, TokenBatches, default_corpus_bytes


def _batches(**kw):
    args = dict(source="synthetic", seq_len=8, vocab_size=50, seed=3, global_batch=8, micro_batch=2,
                dp_rank=0, dp_size=1)
    args.update(kw)
    return TokenBatches(**args)


def test_dp_shards_partition_the_global_batch_identically_for_any_layout():
    serial = _batches()
    ref = torch.cat([serial.micro_batch_tensors(3, m)[0] for m in range(serial.micro_batches)])
    for dp in (2, 4):
        parts = []
        for r in range(dp):
            b = _batches(dp_rank=r, dp_size=dp)
            parts += [b.micro_batch_tensors(3, m)[0] for m in range(b.micro_batches)]
        assert torch.equal(torch.cat(parts), ref)


def test_synthetic_is_learnable_and_targets_shift_inputs():
    x, y, ids = _batches().micro_batch_tensors(0, 0)
    assert ids == [0, 1]
    assert torch.equal(x[:, 1:], y[:, :-1])
    step = (x[:, 1] - x[:, 0]) % 50
    assert torch.equal((x[:, 0:1] + step[:, None] * torch.arange(8)) % 50, x)


def test_text_default_corpus_and_files(tmp_path):
    assert len(default_corpus_bytes(limit=10_000)) == 10_000
    b = _batches(source="text", vocab_size=256)
    x, _, _ = b.micro_batch_tensors(0, 0)
    assert x.dtype == torch.int64 and int(x.max()) < 256
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text " * 20)
    folder = _batches(source="text", vocab_size=256, path=str(tmp_path))
    assert folder.windows == (len("hello world " * 20) + len("more text " * 20) - 1) // 8
    with pytest.raises(DataError, match="too small for byte-level"):
        _batches(source="text", vocab_size=100)
    with pytest.raises(DataError, match="does not exist"):
        _batches(source="text", vocab_size=256, path=str(tmp_path / "nope"))
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(DataError, match="fewer than one window"):
        _batches(source="text", vocab_size=256, path=str(tmp_path / "tiny.txt"))


def test_token_files(tmp_path):
    toks = np.arange(1000, dtype=np.uint16) % 40
    path = tmp_path / "train.bin"
    toks.tofile(path)
    b = _batches(source="tokens", path=str(path), vocab_size=40)
    x, y, _ = b.micro_batch_tensors(0, 0)
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    # every window of an epoch is visited once
    seen = set()
    for k in range(b.windows):
        seen.add(int(b._sample(k)[0]))
    assert len(seen) > 1
    with pytest.raises(DataError, match=">= model.vocab_size=30"):
        bad = _batches(source="tokens", path=str(path), vocab_size=30)
        for k in range(bad.windows):
            bad._sample(k)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="whole number of uint16"):
        _batches(source="tokens", path=str(odd))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        _batches(source="tokens", path=str(tmp_path / "empty.bin"))
    wide = tmp_path / "wide.bin"
    (np.arange(100, dtype=np.uint32) + 70000).tofile(wide)
    w = _batches(source="tokens", path=str(wide), token_dtype="uint32", vocab_size=80000)
    assert int(w.micro_batch_tensors(0, 0)[0].min()) >= 70000
