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


def _sampling(valid: bool) -> dict:
    """Sampling fields: well-formed values (edge ones included) or, unless ``valid``, anything."""
    j = st.nothing() if valid else junk
    models = ["gs", "gs:fast", "gs:quality", "gs:auto"] + ([] if valid else ["gs:nope", "other"])
    fields = {
        "model": st.sampled_from(models) | j,
        "temperature": (st.floats(0, 2) if valid else st.floats(-1, 3)) | st.sampled_from([0, 1e-40, 1e-300, 2.0]) | j,
        "top_p": (st.floats(1e-9, 1) if valid else st.floats(-0.5, 1.5)) | st.sampled_from([1e-50, 1]) | j,
        "top_k": st.integers(-1 if valid else -2, 100) | j,
        "n": st.integers(1 if valid else -1, 3) | j,
        "seed": (st.integers(-(2**63), 2**63 - 1) if valid else st.integers(-(2**64), 2**64)) | j,
        "stop": text | st.lists(st.sampled_from(WORDS), max_size=3) | j,
        "stop_token_ids": st.lists(st.integers(0 if valid else -2, 63), max_size=3) | j,
        "ignore_eos": st.booleans() | j,
        "stream": st.booleans() | j,
        "preset": st.sampled_from(["fast", "quality", "auto"] + ([] if valid else ["nope"])) | j,
        "placement": (st.sampled_from(["FF", "GG", "FG", "KS", "SK"]) if valid else placements) | j,
        "draft": (st.sampled_from(["GG", "KK", "SS"]) if valid else placements) | j,
        "spec_k": st.integers(1 if valid else -1, 8 if valid else 10) | j,
        "user": text | j,
    }
    if not valid:
        fields |= {
            "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}) | junk,
            "presence_penalty": st.floats(-3, 3) | junk,
            "placement": fields["placement"] | st.lists(st.sampled_from(["attention", "gdn", "kda", "x"]), max_size=3),
        }
    return fields


def _with_one_junk_field(body: st.SearchStrategy, names: list[str]) -> st.SearchStrategy:
    """A well-formed body with one field replaced by anything."""
    return st.tuples(body, st.sampled_from(names), junk).map(lambda t: {**t[0], t[1]: t[2]})


def _mix(valid: st.SearchStrategy, names: list[str], fuzzy: st.SearchStrategy) -> st.SearchStrategy:
    """Half well-formed bodies (so requests run: sampling, echo, logprobs, speculation, streaming), a quarter with
    one bad field, a quarter anything."""
    choice = st.sampled_from(["valid", "valid", "one", "fuzzy"])
    return choice.flatmap(
        lambda c: valid if c == "valid" else _with_one_junk_field(valid, names) if c == "one" else fuzzy
    )


def completion_bodies() -> st.SearchStrategy:
    good_text = st.lists(st.sampled_from(WORDS[:49]), min_size=1, max_size=12).map(" ".join)
    good_ids = st.lists(st.integers(0, 63), min_size=1, max_size=12)
    good_prompt = st.one_of(
        good_text, st.lists(good_text, min_size=1, max_size=3), good_ids, st.lists(good_ids, min_size=1, max_size=3)
    )
    extra = {
        "max_tokens": st.integers(1, 24),
        "echo": st.booleans(),
        "logprobs": st.none() | st.integers(0, 5),
    }
    valid = st.fixed_dictionaries({"prompt": good_prompt}, optional={**_sampling(True), **extra})
    prompt = st.one_of(text, st.lists(text, max_size=3), token_ids, st.lists(token_ids, max_size=3), junk)
    fields = {
        **_sampling(False),
        "max_tokens": st.integers(-2, 24) | junk,
        "echo": st.booleans() | junk,
        "logprobs": st.integers(-1, 25) | junk,
        "best_of": st.integers(0, 3) | junk,
    }
    fuzzy = st.fixed_dictionaries({"prompt": prompt}, optional=fields) | st.fixed_dictionaries({}, optional=fields)
    scoring = st.fixed_dictionaries(  # lm-eval's log-likelihood requests
        {
            "prompt": st.lists(good_ids, min_size=1, max_size=3),
            "max_tokens": st.sampled_from([0, 1]),
            "echo": st.just(True),
            "logprobs": st.integers(0, 5),
            "temperature": st.just(0),
        },
        optional={"model": st.sampled_from(["gs", "gs:fast"])},
    )
    return _mix(valid | scoring, ["prompt", *fields], fuzzy)


def chat_bodies() -> st.SearchStrategy:
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | junk, "text": text | junk})
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bad"]) | junk},
        optional={"content": text | st.none() | st.lists(part, max_size=3) | junk, "name": text | junk},
    )
    good_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
    good_message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": text | st.lists(good_part, max_size=2)}
    )
    logprobs = st.just({}) | st.fixed_dictionaries({"logprobs": st.just(True), "top_logprobs": st.integers(0, 5)})
    valid = st.tuples(
        st.fixed_dictionaries(
            {"messages": st.lists(good_message, min_size=1, max_size=3)},
            optional={**_sampling(True), "max_tokens": st.integers(1, 24), "max_completion_tokens": st.integers(1, 24)},
        ),
        logprobs,
    ).map(lambda t: {**t[0], **t[1]})
    fields = {
        **_sampling(False),
        "max_tokens": st.integers(-2, 24) | junk,
        "max_completion_tokens": st.integers(-2, 24) | junk,
        "logprobs": st.booleans() | junk,
        "top_logprobs": st.integers(-1, 25) | junk,
        "response_format": st.none() | st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    }
    messages = st.lists(message, max_size=4) | junk
    fuzzy = st.fixed_dictionaries({"messages": messages}, optional=fields) | st.fixed_dictionaries({}, optional=fields)
    return _mix(valid, ["messages", *fields], fuzzy)
