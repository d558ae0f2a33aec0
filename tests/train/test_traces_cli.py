"""Teacher traces (dedup, resume, chat prompts) and the build-stage command line."""

import json

import pytest
import torch

import train_fixtures as fx
from gearshift.cli import main
from gearshift.data.tokens import TokenShards
from gearshift.model import Supernet
from gearshift.train.traces import PromptError, generate_traces, read_prompts


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    return fx.supernet_dir(tmp_path_factory.mktemp("sn") / "supernet")


def test_traces_dedup_resume_and_chat(supernet, tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("w1 w2 w3\nw4 w5\n\nw1 w2 w3\nw9\n")  # one duplicate, one blank line
    chat = tmp_path / "c.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "w7 w8"}]})
        + "\n"
        + json.dumps({"prompt": "w10 w11"})
        + "\n"
    )
    model = Supernet.from_pretrained(supernet)
    tok = fx.tokenizer()
    prompts = read_prompts([plain, chat])
    assert len(prompts) == 6
    stats = generate_traces(model, tok, prompts[:3], tmp_path / "out", max_new_tokens=6, batch_size=2, seed=1)
    assert stats["distinct"] == 2 and stats["new_sequences"] == 2  # the third prompt repeats the first
    stats = generate_traces(model, tok, prompts, tmp_path / "out", max_new_tokens=6, batch_size=2, seed=1)
    assert stats["distinct"] == 5 and stats["already_done"] == 2 and stats["new_sequences"] == 3
    data = TokenShards(tmp_path / "out")
    assert len(data) == 5
    first = data[0]
    assert 0 < first.prompt_len < len(first.tokens) <= first.prompt_len + 6
    chat_seq = next(s for s in data if tok.convert_ids_to_tokens([int(s.tokens[0])]) == ["<user>"])
    assert tok.convert_ids_to_tokens([int(chat_seq.tokens[chat_seq.prompt_len - 1])]) == ["<assistant>"]
    # greedy traces are the teacher's own greedy continuations
    greedy = generate_traces(model, tok, prompts[:1], tmp_path / "greedy", max_new_tokens=5, temperature=0.0)
    assert greedy["new_sequences"] == 1
    seq = TokenShards(tmp_path / "greedy")[0]
    ids = torch.tensor([seq.tokens[: seq.prompt_len].tolist()])
    expect = model.generate(ids, "all-attention", max_new_tokens=5, eos_token_id=[])[0, seq.prompt_len :].tolist()
    assert seq.tokens[seq.prompt_len :].tolist() == expect[: len(seq.tokens) - seq.prompt_len]
    with pytest.raises(PromptError, match="not found"):
        read_prompts([tmp_path / "missing.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(PromptError, match="'prompt' or 'messages'"):
        read_prompts([bad])


def test_convert_traces_distill_cli(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    fx.teacher().save_pretrained(teacher_dir)
    fx.tokenizer().save_pretrained(teacher_dir)
    assert main(["convert", str(teacher_dir), str(tmp_path / "sn"), "--window", "8"]) == 0
    out = capsys.readouterr().out
    diff = float(out.rsplit("max |diff|", 1)[1])
    assert diff < 1e-4
    assert (tmp_path / "sn" / "tokenizer.json").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2}" for i in range(1, 40)))
    assert (
        main(
            [
                "traces",
                str(tmp_path / "sn"),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "traces"),
                "--max-new-tokens",
                "12",
                "--batch-size",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(f"""
model: {tmp_path / "sn"}
output: {tmp_path / "run"}
data: {{train: [{tmp_path / "traces"}], seq_len: 12, eval_sequences: 4}}
optim: {{steps: 2, batch_size: 2, warmup_steps: 1}}
eval: {{every: 2, placements: [all-attention, all-gdn]}}
checkpoint: {{every: 1}}
""")
    capsys.readouterr()
    assert main(["distill", str(cfg), "--device", "cpu", "--set", "optim.lr=0.001"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval"]["all-attention"]["kl"] < 1e-6 and result["eval"]["all-gdn"]["kl"] > 0
    assert Supernet.from_pretrained(tmp_path / "run" / "final").config.num_layers == 2
    cfg.write_text(cfg.read_text() + "typo_key: 1\n")
    assert main(["distill", str(cfg), "--device", "cpu"]) == 2
    assert "typo_key" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
