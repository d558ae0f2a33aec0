"""Data on disk: token shards (teacher traces, tokenised text) and their readers."""
