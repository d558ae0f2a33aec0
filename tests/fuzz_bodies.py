"""Hypothesis strategies for request bodies of the two generation endpoints: each field well-formed, of a wrong
type, out of range, non-finite or holding lone surrogates; shared by tests/test_server_fuzz.py and
benchmarks/serve_fuzz.py (which draws thousands of them)."""

from hypothesis import strategies as st

WORDS = [f"w{i}" for i in range(1, 50)] + ["<eos>", "<user>", "hello", "é", "😀", " ", ""]
surrogates = st.characters(categories=["Cs"])  # lone surrogates: valid in JSON escapes, not in UTF-8
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.text(alphabet=surrogates, min_size=1, max_size=3),
    st.lists(st.integers(-5, 100), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12).map(" ".join) | st.text(max_size=24)
token_ids = st.lists(st.integers(-3, 80), min_size=0, max_size=12)
placements = st.sampled_from(["FF", "GG", "FG", "KS", "SK", "FX", "F", "all-attention", "fast", "nope"])


def _sampling() -> dict:
    return {
        "model": st.sampled_from(["gs", "gs:fast", "gs:quality", "gs:auto", "gs:nope", "other"]) | junk,
        "temperature": st.floats(-1, 3) | st.sampled_from([0, 1e-40, 1e-300, 2.0]) | junk,
        "top_p": st.floats(-0.5, 1.5) | st.sampled_from([1e-50, 0, 1]) | junk,
        "top_k": st.integers(-2, 100) | junk,
        "n": st.integers(-1, 5) | junk,
        "seed": st.integers(-(2**64), 2**64) | junk,
        "stop": text | st.lists(st.sampled_from(WORDS), max_size=3) | junk,
        "stop_token_ids": st.lists(st.integers(-2, 80), max_size=3) | junk,
        "ignore_eos": st.booleans() | junk,
        "stream": st.booleans() | junk,
        "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}) | junk,
        "preset": st.sampled_from(["fast", "quality", "auto", "nope"]) | junk,
        "placement": placements | st.lists(st.sampled_from(["attention", "gdn", "kda", "x"]), max_size=3) | junk,
        "draft": placements | junk,
        "spec_k": st.integers(-1, 10) | junk,
        "presence_penalty": st.floats(-3, 3) | junk,
        "user": text | junk,
    }


def completion_bodies() -> st.SearchStrategy:
    prompt = st.one_of(
        text,
        st.lists(text, max_size=3),
        token_ids,
        st.lists(token_ids, max_size=3),
        junk,
    )
    fields = {
        **_sampling(),
        "max_tokens": st.integers(-2, 24) | junk,
        "echo": st.booleans() | junk,
        "logprobs": st.integers(-1, 25) | junk,
        "best_of": st.integers(0, 3) | junk,
    }
    return st.fixed_dictionaries({"prompt": prompt}, optional=fields) | st.fixed_dictionaries({}, optional=fields)


def chat_bodies() -> st.SearchStrategy:
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | junk, "text": text | junk})
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bad"]) | junk},
        optional={"content": text | st.none() | st.lists(part, max_size=3) | junk, "name": text | junk},
    )
    fields = {
        **_sampling(),
        "max_tokens": st.integers(-2, 24) | junk,
        "max_completion_tokens": st.integers(-2, 24) | junk,
        "logprobs": st.booleans() | junk,
        "top_logprobs": st.integers(-1, 25) | junk,
        "response_format": st.none() | st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    }
    messages = st.lists(message, max_size=4) | junk
    return st.fixed_dictionaries({"messages": messages}, optional=fields) | st.fixed_dictionaries({}, optional=fields)
