"""Token shards: round trip, resume, atomic index, bad input."""

import json

import pytest

from gearshift.data.tokens import ShardError, TokenShards, TokenShardWriter


def test_round_trip_and_resume(tmp_path):
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    with TokenShardWriter(tmp_path, vocab_size=16, shard_tokens=4) as w:
        for i, s in enumerate(seqs[:3]):
            w.add(s, prompt_len=i)
    with TokenShardWriter(tmp_path, vocab_size=16, shard_tokens=4) as w:  # resume: appends
        assert w.sequences_written == 3
        w.add(seqs[3], prompt_len=1)
    data = TokenShards(tmp_path)
    assert len(data) == 4 and data.num_tokens == 10
    assert [d.tokens.tolist() for d in data] == seqs
    assert [d.prompt_len for d in data] == [0, 1, 2, 1]
    assert len(json.loads((tmp_path / "index.json").read_text())["shards"]) == 3


def test_errors(tmp_path):
    with pytest.raises(ShardError, match="no index.json"):
        TokenShards(tmp_path)
    w = TokenShardWriter(tmp_path / "a", vocab_size=8)
    with pytest.raises(ValueError, match="token ids"):
        w.add([1, 9])
    with pytest.raises(ValueError, match="non-empty"):
        w.add([])
    with pytest.raises(ValueError, match="prompt_len"):
        w.add([1, 2], prompt_len=3)
    w.close()
    with pytest.raises(ShardError, match="no sequences"):
        TokenShards(tmp_path / "a")
    with pytest.raises(ShardError, match="vocab"):
        TokenShardWriter(tmp_path / "a", vocab_size=9)
    with TokenShardWriter(tmp_path / "b", vocab_size=8) as w:
        w.add([1, 2, 3])
    (tmp_path / "b" / "shard-00000.npz").write_bytes(b"broken")
    with pytest.raises(ShardError, match="cannot read"):
        TokenShards(tmp_path / "b")[0]
