"""Log-probabilities through the live server, checked against the model's own full forward (Supernet.forward's
log-softmax on the same tokens): echoed prompts (completions ``logprobs`` + ``echo``, ``max_tokens`` 0 and more),
generated tokens (completions and chat, plain and speculative), every prompt form and ``n``; then lm-eval 0.4.13
through ``local-completions`` (a log-likelihood multiple-choice task and a generation task, from local task files)
and ``local-chat-completions``, and the official openai client."""

import json

import httpx
import openai
import pytest
import torch

import train_fixtures as fx
from gearshift.model import Supernet

from test_server import LiveServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = fx.supernet_dir(tmp_path_factory.mktemp("lp") / "sn")
    model = Supernet.from_pretrained(path)
    model.add_preset("fast", "GG", predicted_quality=0.7, speedup=3.0)
    model.add_preset("mixed", "FK", predicted_quality=0.8, speedup=2.0)
    tok = fx.tokenizer()
    # chunks of 4 prompt tokens: prompt log-probabilities cross chunk boundaries and padded first chunks
    server = LiveServer(model, tok, max_batch=4, max_queue=32, prefill_chunk=4)
    yield model, tok, server, path
    server.close()


def reference(model, ids, placement):
    """log_softmax of the model's own forward: [len(ids), vocab]; row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), placement)[0].float(), -1)


def completion(server, **body):
    r = httpx.post(server.url + "/v1/completions", json={"temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(tok, strings):
    return [tok.convert_tokens_to_ids(s) for s in strings]


@pytest.mark.parametrize("model_id, placement", [("gs:fast", "GG"), ("gs:mixed", "FK"), ("gs", "FF")])
def test_echoed_prompt_logprobs_are_the_models_own(setup, model_id, placement):
    model, tok, server, _ = setup
    prompt = [9, 14, 22, 8, 30, 11, 40, 17, 25, 12, 33]  # 11 tokens: chunks of 4, 4 and 3
    ref = reference(model, prompt, placement)
    r = completion(server, model=model_id, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(prompt) and r["usage"]["completion_tokens"] == 0
    assert lp["tokens"] == [tok.decode([t]) for t in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expect = [float(ref[i - 1, t]) for i, t in enumerate(prompt) if i]
    assert lp["token_logprobs"][1:] == pytest.approx(expect, abs=1e-4)
    for i in range(1, len(prompt)):
        top = ref[i - 1].topk(3)
        alternatives = {tok.decode([int(t)]): float(v) for v, t in zip(top.values, top.indices, strict=True)}
        alternatives.setdefault(tok.decode([prompt[i]]), float(ref[i - 1, prompt[i]]))
        assert lp["top_logprobs"][i] == pytest.approx(alternatives, abs=1e-4)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_echo_and_generation_logprobs_cover_prompt_then_output(setup):
    model, tok, server, _ = setup
    prompt = "w3 w9 w14 w2 w7 w30"
    ids = tok(prompt)["input_ids"]
    r = completion(server, model="gs:fast", prompt=prompt, max_tokens=5, echo=True, logprobs=2, ignore_eos=True)
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 5
    out = ids_of(tok, lp["tokens"][len(ids) :])
    ref = reference(model, ids + out, "GG")
    full = ids + out
    assert lp["token_logprobs"][1:] == pytest.approx(
        [float(ref[i - 1, full[i]]) for i in range(1, len(full))], abs=1e-4
    )
    assert all(
        max(top.values()) == pytest.approx(lp["token_logprobs"][i], abs=1e-5)
        for i, top in enumerate(lp["top_logprobs"])
        if i >= len(ids)
    )  # greedy: every generated token is the most likely one
    assert lp["text_offset"][len(ids)] == len(prompt)  # the output's first token starts where the prompt ends


def test_output_logprobs_speculative_and_n(setup):
    model, tok, server, _ = setup
    prompt = [5, 9, 12, 30]
    plain = completion(server, model="gs:mixed", prompt=prompt, max_tokens=6, logprobs=1, ignore_eos=True)
    spec = completion(server, model="gs:mixed", prompt=prompt, max_tokens=6, logprobs=1, ignore_eos=True, draft="GG")
    assert spec["usage"]["gearshift"]["speculative"]["proposed"] > 0
    for r in (plain, spec):
        lp = r["choices"][0]["logprobs"]
        out = ids_of(tok, lp["tokens"])
        ref = reference(model, prompt + out, "FK")
        expect = [float(ref[len(prompt) - 1 + j, t]) for j, t in enumerate(out)]
        assert lp["token_logprobs"] == pytest.approx(expect, abs=1e-4)
    assert spec["choices"][0]["logprobs"]["tokens"] == plain["choices"][0]["logprobs"]["tokens"]
    sampled = completion(server, model="gs:fast", prompt=prompt, max_tokens=4, n=3, temperature=1.0, seed=3)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    assert sampled["usage"]["prompt_tokens"] == len(prompt)


def test_every_prompt_form_is_a_choice_in_order(setup):
    model, tok, server, _ = setup
    one = completion(server, model="gs:fast", prompt="w1 w2 w3", max_tokens=3)["choices"][0]["text"]
    two = completion(server, model="gs:fast", prompt="w4 w5", max_tokens=3)["choices"][0]["text"]
    for prompt in (["w1 w2 w3", "w4 w5"], [tok("w1 w2 w3")["input_ids"], tok("w4 w5")["input_ids"]]):
        r = completion(server, model="gs:fast", prompt=prompt, max_tokens=3, n=2)
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in r["choices"]] == [one, one, two, two]
    r = completion(server, model="gs:fast", prompt=tok("w1 w2 w3")["input_ids"], max_tokens=3)
    assert r["choices"][0]["text"] == one
    # streaming several choices: each chunk names its choice, each choice ends with its own finish_reason
    body = {"model": "gs:fast", "prompt": ["w1 w2 w3", "w4 w5"], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert texts == {0: one, 1: two}
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 2


def test_chat_logprobs_and_top_logprobs(setup):
    model, tok, server, _ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    r = client.chat.completions.create(
        model="gs:fast", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out = ids_of(tok, [c.token for c in content])
    ref = reference(model, ids + out, "GG")
    for j, c in enumerate(content):
        assert c.logprob == pytest.approx(float(ref[len(ids) - 1 + j, out[j]]), abs=1e-4)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert c.bytes == list(c.token.encode())
    stream = client.chat.completions.create(
        model="gs:fast", messages=messages, max_tokens=4, temperature=0, logprobs=True, stream=True
    )
    streamed = [
        t.token
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content
    ]
    assert streamed == [c.token for c in content]


def test_openai_client_cases(setup):
    _, _, server, _ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = client.completions.create(model="gs:fast", prompt=["w1 w2", "w3"], max_tokens=2, temperature=1e-40, n=2)
    assert len(r.choices) == 4
    r = client.completions.create(model="gs:fast", prompt=[1, 5, 9], max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].logprobs.token_logprobs[0] is None and len(r.choices[0].logprobs.tokens) == 3
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gs", messages=[{"role": "user", "content": "w1"}], temperature=2.5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gs:turbo")
    assert client.models.retrieve("gs:fast").id == "gs:fast"


# ---------------------------------------------------------------------------------------------- lm-eval
MC_DOCS = [
    {"context": "w1 w2 w3", "choices": ["w4", "w5 w6", "w7"], "gold": 0},
    {"context": "w8 w9", "choices": ["w10 w11", "w12"], "gold": 1},
    {"context": "w13 w14 w15 w16", "choices": ["w17", "w18", "w19 w20"], "gold": 2},
    {"context": "w21", "choices": ["w22", "w23"], "gold": 0},
]
GEN_DOCS = [{"context": "w1 w2 w3", "answer": "w4"}, {"context": "w5 w6", "answer": "w7"}]


def write_tasks(folder):
    """Two lm-eval tasks over tiny local data: a log-likelihood multiple-choice one and a generation one."""
    folder.mkdir(exist_ok=True)
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{context}}'\n"
    (folder / "gs_mc.yaml").write_text(
        f"task: gs_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "gs_gen.yaml").write_text(
        f"task: gs_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['w9']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hfcache")))
    from lm_eval.tasks import TaskManager

    # only these tasks: indexing the thousands that lm-eval ships takes a minute on two cores
    return TaskManager(include_path=str(write_tasks(tmp_path_factory.mktemp("tasks"))), include_defaults=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_lm_eval_local_completions_scores_through_the_server(setup, lm_eval_tasks):
    """lm-eval's local-completions runs a log-likelihood multiple-choice task and a generation task against the
    live server; every log-likelihood it records is the model's own (its forward's log-softmax summed over the
    continuation, lm-eval's token split), and the accuracies follow from them."""
    import lm_eval
    import lm_eval.models  # noqa: F401 - lm-eval fills its model registry lazily only while it is empty, and
    # gearshift's own adapter (test_evals_lm_eval.py) may have registered itself in this process already

    model, tok, server, path = setup
    args = (
        f"base_url={server.url}/v1/completions,model=gs:fast,tokenizer={path},tokenizer_backend=huggingface,"
        "tokenized_requests=True,max_retries=1,num_concurrent=2,batch_size=2,max_length=512"
    )
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["gs_mc", "gs_gen"],
        task_manager=lm_eval_tasks,
        limit=4,
        log_samples=True,
        random_seed=0,
    )
    correct = 0
    for sample in out["samples"]["gs_mc"]:
        doc, scores = sample["doc"], []
        for (context, continuation), ((ll, greedy),) in zip(sample["arguments"], sample["resps"], strict=True):
            whole = tok(context + continuation)["input_ids"]
            ctx = tok(context)["input_ids"]
            ref = reference(model, whole, "GG")
            expect = sum(float(ref[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            assert ll == pytest.approx(expect, abs=1e-4)
            assert greedy == all(int(ref[i - 1].argmax()) == whole[i] for i in range(len(ctx), len(whole)))
            scores.append(expect)
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
    assert out["results"]["gs_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))
    gens = out["samples"]["gs_gen"]
    assert len(gens) == 2 and all(isinstance(s["resps"][0][0], str) for s in gens)
    expect = completion(server, model="gs:fast", prompt="w1 w2 w3", max_tokens=6, stop=["w9"])["choices"][0]["text"]
    assert gens[0]["resps"][0][0] == expect


def test_lm_eval_local_chat_completions(setup, lm_eval_tasks):
    import lm_eval
    import lm_eval.models  # noqa: F401 - see above

    _, _, server, _ = setup
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"base_url={server.url}/v1/chat/completions,model=gs:fast,max_retries=1",
        tasks=["gs_gen"],
        task_manager=lm_eval_tasks,
        limit=2,
        apply_chat_template=True,
        log_samples=True,
    )
    assert "exact_match,none" in out["results"]["gs_gen"]
    assert all(isinstance(s["resps"][0][0], str) for s in out["samples"]["gs_gen"])


# ---------------------------------------------------------------------------------------------- the engine itself
def _engine_case(model, device, cuda_graphs):
    """Scoring, logprob and plain requests in one engine (mixed placements, a padded first prefill chunk, chunks
    of 4): returns the requests after running them."""
    from gearshift.serve.engine import Engine, SamplingParams

    engine = Engine(model, max_batch=6, prefill_chunk=4, cuda_graphs=cuda_graphs)
    prompts = [[9, 14, 22, 8, 30, 11, 40], [5, 9], [12, 30, 7, 44, 3, 21, 9, 10, 8], [7, 7, 7]]
    reqs = [
        engine.submit(prompts[0], "GG", SamplingParams(max_tokens=0, prompt_logprobs=2)),
        engine.submit(prompts[1], "FK", SamplingParams(max_tokens=6, logprobs=2, stop_token_ids=())),
        engine.submit(prompts[2], "FF", SamplingParams(max_tokens=5, prompt_logprobs=1, logprobs=0)),
        engine.submit(prompts[3], "GG", SamplingParams(max_tokens=6, stop_token_ids=())),
        engine.submit(prompts[3], "FK", SamplingParams(max_tokens=6, logprobs=1, stop_token_ids=()), draft="GG"),
    ]
    engine.run()
    assert not engine.running and engine.scheduler._logprob_requests == 0
    return reqs


def _check_against_forward(model, reqs):
    for req in reqs:
        placement = "".join({"attention": "F", "gdn": "G", "kda": "K"}[m] for m in req.placement)
        ref = reference(model.cpu(), req.tokens, placement)
        if req.prompt_logprobs is not None:
            assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(req.prompt)
            for i, entry in enumerate(req.prompt_logprobs[1:], start=1):
                assert entry.token == req.prompt[i]
                assert entry.logprob == pytest.approx(float(ref[i - 1, req.prompt[i]]), abs=1e-3)
                assert [t for t, _ in entry.top] == ref[i - 1].topk(req.params.prompt_logprobs).indices.tolist()
        if req.params.logprobs is not None:
            assert [e.token for e in req.logprobs] == req.output
            for j, entry in enumerate(req.logprobs):
                position = len(req.prompt) - 1 + j
                assert entry.logprob == pytest.approx(float(ref[position, entry.token]), abs=1e-3)
                assert len(entry.top) == req.params.logprobs
        else:
            assert req.logprobs == []


def test_engine_prompt_and_output_logprobs(setup):
    model, _, _, _ = setup
    reqs = _engine_case(model, "cpu", cuda_graphs=False)
    assert reqs[0].output == [] and reqs[0].finish_reason == "length"
    _check_against_forward(model, reqs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and decode-ahead need a GPU")
def test_engine_logprobs_and_failures_on_cuda(setup, monkeypatch):
    """On the GPU (CUDA graphs, decoding one step ahead): logprobs equal the model's forward, plain requests
    decode what they decode without logprob requests beside them, and a row whose logits turn NaN fails alone
    (no device-side assert in torch.multinomial)."""
    import copy

    from gearshift.serve.engine import Engine, SamplingParams
    from gearshift.serve.runner import ModelRunner

    model, _, _, _ = setup
    gpu = copy.deepcopy(model).to("cuda").fuse_projections_()
    _check_against_forward(copy.deepcopy(model), _engine_case(gpu, "cuda", cuda_graphs=True))
    engine = Engine(gpu, max_batch=4, cuda_graphs=True)
    plain = [engine.submit([5, 9, 12], "GG", SamplingParams(max_tokens=24, stop_token_ids=())) for _ in range(3)]
    engine.run()
    original = ModelRunner.decode_logits
    steps = {"n": 0}

    def poisoned(self, reqs, *a, **kw):
        logits = original(self, reqs, *a, **kw)
        steps["n"] += 1
        if steps["n"] == 5:
            logits = logits.clone()
            logits[1] = float("nan")
        return logits

    monkeypatch.setattr(ModelRunner, "decode_logits", poisoned)
    reqs = [
        engine.submit([5, 9, 12], "GG", SamplingParams(max_tokens=24, temperature=0.8, stop_token_ids=()))
        for _ in range(3)  # unseeded: the decode-ahead path, which samples on the device
    ]
    engine.run()
    assert [r.finish_reason for r in reqs].count("error") == 1 and reqs[1].finish_reason == "error"
    assert all(len(r.output) == 24 for i, r in enumerate(reqs) if i != 1)
    monkeypatch.undo()
    again = [engine.submit([5, 9, 12], "GG", SamplingParams(max_tokens=24, stop_token_ids=())) for _ in range(3)]
    engine.run()
    assert [r.output for r in again] == [r.output for r in plain]
