"""Distillation and SFT: losses fall, only mixers train, exact resume, 2 processes == 1, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_fixtures as fx
from gearshift.train.config import TrainConfigError, config_from_dict, load_config
from gearshift.train.rows import DataError, PackedRows, chat_tokens
from gearshift.train.samplers import FullLayoutSampler, PredefinedSampler, UniformSampler
from gearshift.train.trainer import Trainer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    fx.supernet_dir(root / "supernet")
    fx.trace_shards(root / "shards", root / "supernet")
    return root


def config(workdir, out, **over):
    cfg = {
        "model": str(workdir / "supernet"),
        "output": str(out),
        "data": {"train": [str(workdir / "shards")], "seq_len": 16, "eval_sequences": 8},
        "optim": {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "dtype": "float32"},
        "sampler": {"kind": "uniform"},
        "loss": {"activation": 0.5, "reverse_kl": 1.0, "forward_kl": 0.5},
        "eval": {"every": 0, "placements": ["all-attention", "all-gdn"]},
        "checkpoint": {"every": 3, "keep": 2},
        "log_every": 1,
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            cfg.setdefault(section, {})[leaf] = value
        else:
            cfg[section] = value
    return config_from_dict(cfg)


@pytest.mark.parametrize("mixer", ["sliding_window", "gdn", "kda"])
def test_distillation_lowers_each_mixers_kl_and_trains_only_mixers(workdir, tmp_path, mixer):
    placement = "all-" + mixer
    cfg = config(
        workdir,
        tmp_path,
        sampler={"kind": "predefined", "placements": {placement: 1.0}},
        optim__steps=20,
        data__seq_len=24,
    )
    trainer = Trainer(cfg, device="cpu")
    seen = PackedRows(trainer.rows.tokens[:32], trainer.rows.mask[:32])  # the loss being trained, on its rows
    before = trainer.evaluate([placement, "all-attention"], rows=seen)
    shared = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if ".mixers." not in n}
    frozen_fa = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if ".mixers.attention." in n}
    trainer.run()
    after = trainer.evaluate([placement, "all-attention"], rows=seen)
    assert after[placement]["kl"] < 0.95 * before[placement]["kl"], (before, after)
    assert after["all-attention"]["kl"] < 1e-6  # the all-attention path stays the teacher
    for name, p in trainer.student.named_parameters():
        if name in shared or name in frozen_fa:
            assert torch.equal(p, (shared | frozen_fa)[name]), name
    changed = [n for n, p in trainer.trainable.items() if f".mixers.{mixer}." in n]
    assert changed
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert set(final) >= set(trainer.trainable)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and "act_by_mixer" in rows[-1] and len(rows[-1]["layer_act"]) == 2


def test_align_lowers_each_mixers_error_and_kl_on_teacher_inputs(workdir, tmp_path):
    """Layer-local alignment: every mixer of every layer learns at every step, on the teacher's own inputs."""
    cfg = config(
        workdir, tmp_path, mode="align", optim__steps=40, optim__lr=3e-2, data__seq_len=24, optim__frozen_mixers=[]
    )
    trainer = Trainer(cfg, device="cpu")
    assert trainer.align_mixers == [["attention", "sliding_window", "gdn", "kda"]] * 2
    seen = PackedRows(trainer.rows.tokens[:32], trainer.rows.mask[:32])
    # the teacher's own attention on the teacher's own inputs: zero error, so the inputs are the right ones
    err0 = trainer.align_error(seen)
    assert err0["attention"]["mse"] < 1e-10 and all(err0[m]["relative"] > 0.05 for m in ("gdn", "kda")), err0
    assert err0["gdn"]["relative"] == pytest.approx(1.0)  # DIL's z = 0 gate: GDN starts as a zero output
    placements = ["all-gdn", "all-kda"]
    before = trainer.evaluate(placements, rows=seen)
    shared = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if ".mixers." not in n}
    trainer.run()
    err1 = trainer.align_error(seen)
    for m in ("sliding_window", "gdn", "kda"):
        assert err1[m]["mse"] < 0.85 * err0[m]["mse"], (m, err0, err1)
    after = trainer.evaluate(placements, rows=seen)
    for p in placements:
        assert after[p]["kl"] < 0.95 * before[p]["kl"], (p, before[p], after[p])
    for name, p in trainer.student.named_parameters():
        if name in shared:
            assert torch.equal(p, shared[name]), name
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and len(rows[-1]["layer_act"]) == 2 and set(rows[-1]["act_by_mixer"]) == set(err0)
    only = Trainer(config(workdir, tmp_path / "g", mode="align", sampler={"kind": "uniform", "mixers": ["gdn"]}))
    assert only.align_mixers == [["gdn"]] * 2
    with pytest.raises(TrainConfigError, match="align trains mixers only"):
        config(workdir, tmp_path, mode="align", optim__train="all")


@pytest.mark.parametrize("mode", ["distill", "align"])
def test_resume_is_bit_identical(workdir, tmp_path, monkeypatch, mode):
    straight = Trainer(config(workdir, tmp_path / "a", mode=mode), device="cpu")
    straight.run()
    # the same run killed in the middle of step 5 (its step-3 checkpoint survives, steps 4-5 are lost) ...
    doomed = Trainer(config(workdir, tmp_path / "b", mode=mode), device="cpu")
    real_step = Trainer.train_step

    def dying_step(self):
        if self.step == 4:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        doomed.run()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    # ... with a half-written temporary file beside it, as a kill during a checkpoint write would leave
    (tmp_path / "b" / "checkpoints" / ".step-0000006.pt.tmp").write_bytes(b"partial")
    resumed = Trainer(config(workdir, tmp_path / "b", mode=mode), device="cpu")
    assert resumed.step == 3
    resumed.run()
    for name, p in straight.trainable.items():
        assert torch.equal(p, resumed.trainable[name]), name
    a = straight.optimizer.state_dict()["state"]
    b = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_resume_refuses_a_checkpoint_of_another_configuration(workdir, tmp_path):
    Trainer(config(workdir, tmp_path, optim__steps=3), device="cpu").run()
    with pytest.raises(ValueError, match="another configuration.*optim.mixer_lr.*another output directory.*--resume"):
        Trainer(config(workdir, tmp_path, optim__steps=3, optim__mixer_lr={"gdn": 2.0}), device="cpu")


def test_time_budget_stops_and_saves(workdir, tmp_path):
    trainer = Trainer(config(workdir, tmp_path, optim__steps=50, optim__max_minutes=1e-6), device="cpu")
    trainer.run()
    assert trainer.step == 1  # stopped after the first step ran over its (tiny) budget
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "step-0000001.pt").exists()  # and checkpointed where it stopped


def test_full_options_run(workdir, tmp_path):
    """Sandwich + full_layout + gradient accumulation + activation checkpointing + eval + SFT-style CE."""
    cfg = config(
        workdir,
        tmp_path,
        sampler={"kind": "full_layout", "sandwich": True, "placements": {"GK": 1.0}, "predefined_prob": 0.5},
        optim__grad_accum=2,
        optim__activation_checkpointing=True,
        optim__steps=3,
        optim__frozen_mixers=[],
        loss={"activation": 0.3, "reverse_kl": 1.0, "cross_entropy": 0.1, "temperature": 2.0},
        eval={"every": 2, "placements": ["all-attention", "GK"]},
    )
    trainer = Trainer(cfg, device="cpu")
    assert len(trainer.placements_for(0)) == 3  # sampled + all-attention (trainable here) + cheapest (all-gdn)
    frozen = Trainer(config(workdir, tmp_path / "f", sampler={"kind": "uniform", "sandwich": True}), device="cpu")
    assert all(p != ("attention", "attention") for s in range(20) for p in frozen.placements_for(s))
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in rows) and all(r.get("ce", 1) > 0 for r in rows if "ce" in r)


def _process_config(workdir, steps: int, checkpoint_every: int) -> dict:
    """The config of the multi-process tests (one process at batch 4; two take batch 2 each)."""
    return {
        "model": str(workdir / "supernet"),
        "data": {"train": [str(workdir / "shards")], "seq_len": 16, "eval_sequences": 8},
        "optim": {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "dtype": "float32"},
        "eval": {"every": 0},
        "checkpoint": {"every": checkpoint_every},
        "log_every": 1,
    }


def _cli(*args: str, processes: int = 1) -> None:
    """`python -m gearshift.cli ARGS --device cpu`, under torchrun when ``processes`` > 1; it must succeed."""
    launcher = []
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launcher += ["--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, *launcher, "-m", "gearshift.cli", *args, "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("mode", ["distill", "align"])
def test_two_processes_match_one(workdir, tmp_path, mode):
    base = {**_process_config(workdir, steps=3, checkpoint_every=0), "mode": mode}
    one = tmp_path / "one.json"
    one.write_text(json.dumps({**base, "output": str(tmp_path / "one")}))
    two = tmp_path / "two.json"
    two.write_text(json.dumps({**base, "output": str(tmp_path / "two"), "optim": {**base["optim"], "batch_size": 2}}))
    _cli(mode, str(one))
    _cli(mode, str(two), processes=2)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert any(not torch.equal(a[k], load_file(workdir / "supernet" / "model.safetensors")[k]) for k in a)
    la = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 3
    # the logged loss is the mean over the whole step's tokens on every rank, so the curves agree too
    assert max(abs(a - b) for a, b in zip(la, lb, strict=True)) < 1e-4, (la, lb)


def test_fsdp_matches_one_process_and_resumes_under_either_strategy(workdir, tmp_path):
    """FSDP over 2 processes == 1 process at the same global batch. Its checkpoints hold full tensors, so a run
    killed after its step-3 checkpoint continues under FSDP or on one process and ends where a straight run ends."""
    base = _process_config(workdir, steps=5, checkpoint_every=3)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({**base, "output": str(tmp_path / "one")}))
    sharded = {
        **base,
        "output": str(tmp_path / "fsdp"),
        "parallel": "fsdp",
        "optim": {**base["optim"], "batch_size": 2},
    }
    two = tmp_path / "fsdp.json"
    two.write_text(json.dumps(sharded))

    def final(run_dir):
        return load_file(tmp_path / run_dir / "final" / "model.safetensors")

    def losses(run_dir):
        rows = [json.loads(x) for x in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    _cli("distill", str(one))
    _cli("distill", str(two), processes=2)
    a = final("one")
    assert max((a[k] - final("fsdp")[k]).abs().max().item() for k in a) < 1e-5
    la, lb = losses("one"), losses("fsdp")
    assert len(la) == len(lb) == 5 and max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-4, (la, lb)
    saved = torch.load(tmp_path / "fsdp" / "checkpoints" / "step-0000003.pt", weights_only=False)
    reference = load_file(workdir / "supernet" / "model.safetensors")
    assert all(t.shape == reference[n].shape for n, t in saved["trainable"].items())  # full, not one rank's shard
    # the run killed after its step-3 checkpoint: steps 4-5, their checkpoint and the final weights lost
    for copy in ("again", "alone"):
        shutil.copytree(tmp_path / "fsdp", tmp_path / copy)
        shutil.rmtree(tmp_path / copy / "final")
        (tmp_path / copy / "checkpoints" / "step-0000005.pt").unlink()
        (tmp_path / copy / "checkpoints" / "latest").write_text("step-0000003.pt")
    _cli("distill", str(two), "--set", f"output={tmp_path / 'again'}", processes=2)  # continued under FSDP ...
    # ... and on one process (parallel=fsdp is moot there)
    _cli("distill", str(two), "--set", f"output={tmp_path / 'alone'}", "--set", "optim.batch_size=4")
    for copy in ("again", "alone"):
        b = final(copy)
        assert set(a) == set(b)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, copy


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sft_masks_non_assistant_tokens(workdir, tmp_path):
    tok = fx.tokenizer()
    messages = [
        {"role": "user", "content": "w1 w2"},
        {"role": "assistant", "content": "w3 w4 w5"},
        {"role": "user", "content": "w6"},
        {"role": "assistant", "content": "w7"},
    ]
    ids, mask = chat_tokens(tok, messages)
    words = tok.convert_ids_to_tokens(ids)
    assert [w for w, m in zip(words, mask, strict=True) if m] == [
        "<assistant>",
        "w3",
        "w4",
        "w5",
        "<end>",
        "<assistant>",
        "w7",
        "<end>",
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": messages}) for _ in range(30)))
    cfg = config(
        workdir,
        tmp_path / "sft",
        mode="sft",
        data={"train": [str(chat)], "chat": True, "seq_len": 16},
        sampler={"kind": "predefined", "placements": {"GK": 1.0, "SG": 1.0}},
        loss={"activation": 0.0, "reverse_kl": 0.0, "cross_entropy": 1.0},
        optim__steps=4,
    )
    trainer = Trainer(cfg, device="cpu")
    assert trainer.rows.mask.mean() < 0.9  # user turns are not trained on
    first = trainer.train_step()["ce"]
    for _ in range(3):
        last = trainer.train_step()["ce"]
    assert last < first


def test_bad_configs_and_data(workdir, tmp_path):
    with pytest.raises(TrainConfigError, match="unknown config key.*optim.learning_rate"):
        config_from_dict({"model": "m", "data": {"train": ["x"]}, "optim": {"learning_rate": 1}})
    with pytest.raises(TrainConfigError, match="data.train"):
        config_from_dict({"model": "m"})
    with pytest.raises(TrainConfigError, match="optim.steps: expected a whole number, got 'ten'"):
        config_from_dict({"model": "m", "data": {"train": ["x"]}, "optim": {"steps": "ten"}})
    bad = tmp_path / "c.toml"
    bad.write_text("model = 'm'\n[data]\ntrain = ['x']\n[losses]\nkl = 1\n")
    with pytest.raises(TrainConfigError, match="unknown config key.*losses"):
        load_config(bad)
    with pytest.raises(TrainConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty text file"):
        Trainer(config(workdir, tmp_path / "o", data={"train": [str(empty)], "seq_len": 8}), device="cpu")
    with pytest.raises(DataError, match="not found"):
        Trainer(config(workdir, tmp_path / "o", data={"train": [str(tmp_path / "missing")]}), device="cpu")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError):
        Trainer(config(workdir, tmp_path / "o", data={"train": [str(binary)], "seq_len": 8}), device="cpu")


def test_samplers_are_deterministic_and_cover_compositions(tiny_config):
    u = UniformSampler(tiny_config, seed=3)
    assert [u.sample(s) for s in range(5)] == [UniformSampler(tiny_config, seed=3).sample(s) for s in range(5)]
    f = FullLayoutSampler(tiny_config, seed=0)
    counts = {}
    for s in range(2000):
        p = f.sample(s)
        key = tuple(sorted(p.count(k) for k in ("attention", "sliding_window", "gdn", "kda")))
        counts[key] = counts.get(key, 0) + 1
    assert counts[(0, 0, 0, 4)] > 2000 / 35 * 4 * 0.6  # all-one-mixer placements are common (4 of 35 compositions)
    uniform_all_same = sum(len(set(u.sample(s))) == 1 for s in range(2000))
    assert uniform_all_same < counts[(0, 0, 0, 4)]
    p = PredefinedSampler(tiny_config, {"FFFF": 1.0, "GGGG": 3.0}, seed=0)
    draws = [p.sample(s) for s in range(4000)]
    share = sum(d == ("gdn",) * 4 for d in draws) / len(draws)
    assert abs(share - 0.75) < 0.03
    restricted = UniformSampler(tiny_config, seed=0, mixers=["gdn", "kda"])
    assert all(set(restricted.sample(s)) <= {"gdn", "kda"} for s in range(50))


def test_a_typed_config_needs_no_pydantic(tmp_path):
    """A config whose values already have their declared types (what code and the build pipeline pass) is built
    without importing pydantic, which some GPU images lack; coercing text (YAML's '3e-4') still uses it."""
    import subprocess
    import sys

    from gearshift.train.config import TrainConfig

    raw = TrainConfig().to_dict()
    raw["model"], raw["data"]["train"] = str(tmp_path / "ckpt"), [str(tmp_path / "shards")]
    data = json.dumps(raw)  # through JSON: tuples come back as lists, which a tuple field takes as they are
    probe = (
        "import json, sys; sys.modules['pydantic'] = None\n"
        "from gearshift.train.config import config_from_dict\n"
        f"cfg = config_from_dict(json.loads({data!r}))\n"
        "print('OK', cfg.optim.lr)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-500:]
