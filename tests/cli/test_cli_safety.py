"""Issue 24: the command line never loses a user's work, reports bad input in one line, and behaves like the tools
users know (help with defaults, --version, lazy start-up, names, reports). One test (or more) per numbered item;
items 3 and 10 are in test_cli_signals.py and test_report_cli.py, item 6 in test_install_extras.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_fixtures as fx
from gearshift.checkpoint import fingerprint, read_config
from gearshift.cli import build_parser, main
from gearshift.config import SupernetConfig
from gearshift.memory import available_bytes
from gearshift.model import Supernet
from gearshift.placement import PlacementError, placement_for_model_id, placement_letters, resolve_placement
from gearshift.train.config import TrainConfigError, config_differences, load_config
from gearshift.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    assert main(["init", str(path)]) == 0
    return path


def _weights(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------ 1. overwriting


def test_thin_in_place_and_init_over_a_checkpoint_need_overwrite(ckpt, tmp_path, capsys):
    assert main(["preset", "add", str(ckpt), "fast", "GGGG"]) == 0
    before = _weights(ckpt)
    capsys.readouterr()
    # thinning in place would delete the SWA/GDN/KDA weights and the presets: refused without --overwrite
    assert main(["thin", str(ckpt), str(ckpt), "--placement", "FFFF"]) == 2
    err = capsys.readouterr().err
    assert "is the checkpoint being read" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _weights(ckpt) == before and json.loads((ckpt / "presets.json").read_text())["presets"]["fast"]
    assert main(["init", str(ckpt), "--seed", "1"]) == 2
    assert "exists (a checkpoint)" in capsys.readouterr().err and _weights(ckpt) == before
    # a non-empty directory that is not a checkpoint is refused too
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert main(["init", str(other)]) == 2 and "not empty" in capsys.readouterr().err
    # with --overwrite the user asked for it
    assert main(["init", str(ckpt), "--seed", "1", "--overwrite"]) == 0 and _weights(ckpt) != before
    assert main(["thin", str(ckpt), str(ckpt), "--placement", "FFFF", "--overwrite"]) == 0
    assert set(read_config(ckpt)[0].layers[0].mixers) == {"attention"}


def test_thin_keeps_a_kept_default_and_lists_what_it_dropped(tiny_model, tmp_path, capsys):
    model = Supernet.from_pretrained(_save(tiny_model, tmp_path / "full"))
    model.add_preset("fast", "GGKG")
    model.add_preset("mixed", "SGKF")
    model.save_pretrained(tmp_path / "full")
    assert (
        main(["thin", str(tmp_path / "full"), str(tmp_path / "thin"), "--placement", "GGKG", "--placement", "FSGK"])
        == 0
    )
    out = capsys.readouterr().out
    cfg = read_config(tmp_path / "thin")[0]
    # the full model's default (all-attention) is not kept: the first kept placement becomes the default, never a
    # per-layer mix of the two (FGKG before)
    assert placement_letters(cfg.default_placement, cfg) == "GGKG"
    assert "dropped mixers:" in out and "attention in 3 layer(s)" in out and "dropped presets" in out and "mixed" in out
    assert "default placement: GGKG" in out
    # a kept default stays
    thinned = model.thinned_config(["FFFF", "GGGG"])
    assert thinned.default_placement == tiny_model.config.default_placement


def _save(model, path):
    model.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ 2. serve


def _busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_serve_reports_a_busy_port_and_bad_sizes_in_one_line(ckpt, capsys):
    sock, port = _busy_port()
    try:
        assert main(["serve", str(ckpt), "--port", str(port)]) == 2  # before any loading or allocation
        err = capsys.readouterr().err
        assert f"127.0.0.1:{port}" in err and "--port" in err and len(err.strip().splitlines()) == 1
    finally:
        sock.close()
    for bad in (["--max-batch", "0"], ["--max-num-seqs", "-1"], ["--max-model-len", "0"], ["--port", "70000"]):
        assert main(["serve", str(ckpt), *bad]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("must be >= 1" in err or "65535" in err)
    args = build_parser().parse_args(
        ["serve", str(ckpt), "--max-num-seqs", "3", "--max-model-len", "64", "--served-model-name", "m"]
    )
    assert (args.max_batch, args.max_context, args.name) == (3, 64, "m")


def test_serve_sizes_cpu_pools_from_available_memory(tmp_path):
    """The CPU default: pools fit half the memory available after loading, and the server says what it reserved.
    Starts the real server (a subprocess) and stops it with SIGTERM once it has reported."""
    supernet = fx.supernet_dir(tmp_path / "supernet")
    free = available_bytes("cpu")
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    sock, port = _busy_port()
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gearshift", "serve", str(supernet), "--port", str(port), "--max-batch", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert line.startswith("decoding state: reserved"), (line, err)
    assert "budget" in line and "50% of the" in line and "available" in line
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ 4. resume identity


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    fx.supernet_dir(root / "supernet")
    fx.trace_shards(root / "shards", root / "supernet")
    return root


def _train_config(workdir, out, mode="distill", **optim):
    from gearshift.train.config import config_from_dict

    return config_from_dict(
        {
            "model": str(workdir / "supernet"),
            "output": str(out),
            "mode": mode,
            "data": {"train": [str(workdir / "shards")], "seq_len": 16, "eval_sequences": 8},
            "optim": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "dtype": "float32", **optim},
            "eval": {"every": 0, "placements": ["all-gdn"]},
            "checkpoint": {"every": 3},
        }
    )


def test_a_checkpoint_of_another_mode_is_refused_unless_resume(workdir, tmp_path, capsys):
    Trainer(_train_config(workdir, tmp_path, "align"), device="cpu").run()
    with pytest.raises(ValueError, match="holds a checkpoint of an align run.*differs in mode.*--resume"):
        Trainer(_train_config(workdir, tmp_path, "distill", steps=5), device="cpu")
    resumed = Trainer(_train_config(workdir, tmp_path, "distill", steps=5), device="cpu", resume=True)
    assert resumed.step == 3
    # more steps, another time budget or evaluation schedule: the same run, resumed without asking
    again = Trainer(_train_config(workdir, tmp_path, "align", steps=6, max_minutes=5.0), device="cpu", log=print)
    assert again.step == 3 and "resuming from step 3" in capsys.readouterr().out
    assert config_differences({"optim": {"steps": 1, "lr": 1.0}}, {"optim": {"steps": 2, "lr": 2.0}}) == ["optim.lr"]


# ------------------------------------------------------------------------------------------ 5. place measure


def test_place_measure_refuses_another_checkpoints_table(workdir, tmp_path, capsys):
    other = tmp_path / "other"
    model = Supernet.from_pretrained(workdir / "supernet")
    with torch.no_grad():
        model.blocks[0].mixer.mixers["gdn"].out_proj.weight.add_(0.01)  # a "trained" copy: same config, other weights
    model.save_pretrained(other, copy_from=workdir / "supernet")
    assert fingerprint(other) != fingerprint(workdir / "supernet")
    model.add_preset("fast", "GG")
    model.save_pretrained(other, copy_from=workdir / "supernet")
    assert fingerprint(other) == fingerprint(other)  # presets do not count
    table = tmp_path / "table.jsonl"
    common = ["--data", str(workdir / "shards"), "--out", str(table), "--device", "cpu", "--sequences", "4"]
    assert main(["place", "measure", str(workdir / "supernet"), "--placements", "stratified:3", *common]) == 0
    rows = table.read_text().splitlines()
    assert json.loads(rows[0])["model"] == fingerprint(workdir / "supernet")
    capsys.readouterr()
    assert main(["place", "measure", str(other), "--placements", "stratified:5", *common]) == 2
    assert "another checkpoint" in capsys.readouterr().err
    assert table.read_text().splitlines() == rows  # nothing appended
    assert main(["place", "measure", str(workdir / "supernet"), "--placements", "stratified:5", *common]) == 0


# ------------------------------------------------------------------------------------------ 7. typed config


def test_config_values_are_coerced_or_refused_in_one_line(workdir, tmp_path, capsys):
    cfg_file = tmp_path / "d.yaml"
    cfg_file.write_text(
        f"model: {workdir / 'supernet'}\noutput: {tmp_path / 'out'}\n"
        f"data: {{train: [{workdir / 'shards'}], seq_len: 16}}\noptim: {{lr: 3e-4, steps: 2, betas: [0.9, '0.99']}}\n"
    )
    cfg = load_config(cfg_file)  # PyYAML reads 3e-4 as the string '3e-4'
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.9, 0.99)
    assert load_config(cfg_file, {"optim.steps": "7"}).optim.steps == 7
    for key, value, expected in [
        ("optim.lr", "abc", "optim.lr: expected a number, got 'abc'"),
        ("optim.steps", 2.5, "optim.steps: expected a whole number"),
        ("optim.steps", True, "optim.steps: expected a whole number"),
        ("output", 3, "output: expected a string"),
        ("optim.betas", [0.9], "optim.betas"),
    ]:
        with pytest.raises(TrainConfigError, match=expected):
            load_config(cfg_file, {key: value})
    assert main(["distill", str(cfg_file), "--set", "optim.lr=abc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: optim.lr: expected a number, got 'abc' (Input should be a valid number, unable to " \
        "parse string as a number)"  # fmt: skip


# ------------------------------------------------------------------------------------------ 8. tracebacks


def test_generate_init_and_serve_bad_input_are_one_line(ckpt, tmp_path, capsys):
    assert main(["generate", str(ckpt), "--ids", "1,2,999", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "999" in err and "vocabulary" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(ckpt), "--ids", "1,x", "--device", "cpu"]) == 2
    assert "whole numbers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Supernet.from_pretrained(ckpt).generate([[1, -3]], max_new_tokens=1)
    with torch.device("meta"):
        params = Supernet(SupernetConfig.apriel_15b()).num_parameters(all_mixers=True)
    if available_bytes("cpu") < params * 2:  # CI's 24 GB: the estimate stops it before any allocation
        assert main(["init", str(tmp_path / "big"), "--shape", "apriel-15b"]) == 2
        err = capsys.readouterr().err
        assert "bfloat16" in err and "more than the" in err and "available" in err and not (tmp_path / "big").exists()


# ------------------------------------------------------------------------------------------ 9. empty held-out set


def test_an_empty_held_out_set_gives_no_numbers_and_a_warning(workdir, tmp_path):
    few = fx.shards(tmp_path / "few", n=3, length=18)
    from gearshift.train.config import config_from_dict

    logged = []
    cfg = config_from_dict(
        {
            "model": str(workdir / "supernet"),
            "output": str(tmp_path / "o"),
            "data": {"train": [str(few)], "seq_len": 16},
            "optim": {"steps": 1, "batch_size": 2, "dtype": "float32"},
            "eval": {"every": 1, "placements": ["all-gdn"]},
        }
    )
    trainer = Trainer(cfg, device="cpu", log=logged.append)
    assert any("no held-out rows" in line and "data.eval" in line for line in logged)
    assert trainer.evaluate() == {}  # not kl 0.0 / agreement 0.0, which reads as a perfect score
    trainer.run()
    metrics = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert all(row.get("eval", {}) == {} for row in metrics)


# ------------------------------------------------------------------------------------------ conventions


def _options(parser, path=()):
    """(command path, action) of every option of every (sub-)command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, action


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    options = list(_options(parser))
    assert len(options) > 200
    missing = [f"{' '.join(p)} {a.option_strings[0]}" for p, a in options if not a.help]
    assert not missing, missing
    sub = {name: p for name, p in parser._subparsers._group_actions[0].choices.items()}
    for command, text in [
        ("init", "random seed of the weights (default: 0)"),
        ("generate", "0 = greedy decoding (default: 0.0)"),
    ]:
        assert text in " ".join(sub[command].format_help().split())
    assert "(default: 32)" in sub["serve"].format_help() and "temperature" in sub["serve"].format_help()


def test_version_and_lazy_startup(ckpt):
    out = subprocess.run([sys.executable, "-m", "gearshift", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "gearshift 0.1.0"
    # neither --help nor info loads torch (or any stage's extra): they start in a blink (benchmarks/cli_startup.py)
    probe = (
        "import sys; from gearshift.cli import main\n"
        "for argv in (['info', sys.argv[1]],):\n    main(argv)\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'scipy', 'sklearn', 'transformers', 'fastapi', 'tqdm') if m in "
        "sys.modules]\nprint('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(ckpt)], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-300:]


def test_placement_names_aliases_and_model_ids(tiny_model, tiny_config):
    n = tiny_config.num_layers
    for alias, kind in [("swa", "sliding_window"), ("all-swa", "sliding_window"), ("ALL-SWA", "sliding_window")]:
        assert resolve_placement(alias, tiny_config) == resolve_placement([kind] * n, tiny_config)
    assert resolve_placement(["swa", "fa", "G", "kda"], tiny_config) == resolve_placement("SFGK", tiny_config)
    model = Supernet(tiny_config)
    for bad in ("all-kda", "kda", "swa", "GGKG", "fsgk", "auto"):
        with pytest.raises(PlacementError, match="reads as a placement"):
            model.add_preset(bad, "GGGG")
    model.add_preset("fast", "GGKG")
    assert placement_for_model_id("fast", tiny_config, model.presets) == ("fast", model.presets["fast"])
    assert placement_for_model_id("GGKG", tiny_config, model.presets)[0] == "GGKG"
    assert placement_for_model_id("all-swa", tiny_config, model.presets)[0] == "SSSS"
    with pytest.raises(PlacementError, match="neither a preset \\(available: fast\\)"):
        placement_for_model_id("turbo", tiny_config, model.presets)


def test_server_accepts_letter_placements_as_model_ids(tiny_model, tmp_path):
    from fastapi.testclient import TestClient

    from gearshift.demo import tiny_tokenizer
    from gearshift.serve.engine import Engine
    from gearshift.serve.server import create_app

    model = Supernet.from_pretrained(_save(tiny_model, tmp_path / "m"))
    model.add_preset("fast", "GGKG")
    tok = tiny_tokenizer(model.config.vocab_size)
    with TestClient(create_app(Engine(model, max_batch=2), tok)) as client:
        body = {"prompt": "w1 w2 w3", "max_tokens": 3, "temperature": 0}
        letters = client.post("/v1/completions", json={**body, "model": "gearshift:GGKG"})
        preset = client.post("/v1/completions", json={**body, "model": "gearshift:fast"})
        assert letters.status_code == preset.status_code == 200
        assert letters.json()["choices"][0]["text"] == preset.json()["choices"][0]["text"]
        bad = client.post("/v1/completions", json={**body, "model": "gearshift:XXXX"})
        assert bad.status_code == 404 and "available: fast" in bad.json()["error"]["message"]


def test_generate_streams_each_token(tiny_model):
    seen = []
    out = tiny_model.generate([[1, 2, 3]], "FSGK", max_new_tokens=5, on_token=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 3:].tolist() and len(seen) == 5


def test_progress_bars_show_rates(workdir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GEARSHIFT_PROGRESS": "1"}
    cmd = ["place", "measure", str(workdir / "supernet"), "--data", str(workdir / "shards"), "--placements"]
    cmd += ["stratified:4", "--out", str(tmp_path / "t.jsonl"), "--device", "cpu", "--sequences", "4"]
    out = subprocess.run([sys.executable, "-m", "gearshift", *cmd], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "measure: 100%" in out.stderr and "placement/s" in out.stderr


# ------------------------------------------------------------------------------------------ reports


def test_info_eval_report_and_optimize_agree(workdir, tmp_path, capsys):
    """Presets written by 'place optimize' carry their speed-up; 'eval report' models it at the same context and
    batch (never beyond the checkpoint's context), so the names and the report agree; 'info' shows a table."""
    ckpt = tmp_path / "ck"
    Supernet.from_pretrained(workdir / "supernet").save_pretrained(ckpt, copy_from=workdir / "supernet")
    table = tmp_path / "t.jsonl"
    common = ["--data", str(workdir / "shards"), "--device", "cpu", "--sequences", "6"]
    assert main(["place", "measure", str(ckpt), "--placements", "stratified:40", "--out", str(table), *common]) == 0
    assert main(["place", "fit", str(table), "--out", str(tmp_path / "fit.json"), "--no-plots", "--r", "1"]) == 0
    capsys.readouterr()
    assert main(["place", "optimize", str(ckpt), "--fit", str(tmp_path / "fit.json"), "--presets", "3", "--write"]) == 0
    out = capsys.readouterr().out
    presets = json.loads((ckpt / "presets.json").read_text())["presets"]
    assert len(presets) == 3 or "note: asked for 3 presets" in out
    assert all(p["speedup"] >= 1.0 - 1e-9 for p in presets.values())  # never slower than all-attention
    assert main(["info", str(ckpt)]) == 0
    info = capsys.readouterr().out
    assert "F/S/G/K" in info and all(name in info for name in presets)
    results = tmp_path / "r.json"
    rows = [{"preset": "all-attention", "placement": "FF", "scores": {"t": 0.5}}]
    rows += [{"preset": n, "placement": p["letters"], "scores": {"t": 0.4}} for n, p in presets.items()]
    results.write_text(json.dumps({"format": "gearshift-eval/1", "kind": "tasks", "rows": rows}))
    assert main(["eval", "report", str(ckpt), "--results", str(results), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    context = read_config(ckpt)[0].max_position_embeddings
    assert report["settings"]["context"] <= context
    for row in report["rows"][1:]:
        assert row["modelled_speedup"] == pytest.approx(presets[row["preset"]]["speedup"], rel=1e-6)
    # asking for more than the checkpoint's context is capped, and said so
    assert main(["eval", "report", str(ckpt), "--results", str(results), "--context", "100000"]) == 0
    assert f"capped at the checkpoint's {context}" in capsys.readouterr().err


def test_optimize_returns_the_presets_asked_for_or_says_why(tiny_config):
    import numpy as np

    from gearshift.search.cost_sources import CostTerms, modelled_costs
    from gearshift.search.optimize import optimize
    from gearshift.search.space import PlacementSpace
    from search_fixtures import synthetic_fit

    space = PlacementSpace.from_config(tiny_config)
    fit = synthetic_fit(space)
    costs = CostTerms.from_model(
        modelled_costs(tiny_config, batch=8, context=tiny_config.max_position_embeddings), space
    )
    result = optimize(fit, costs, n_presets=3)
    assert len(result.presets) == 3 and len({p.placement for p in result.presets}) == 3
    assert all(p.speedup >= 1 - 1e-9 for p in result.presets)
    many = optimize(fit, costs, n_presets=10_000)
    assert len(many.presets) < 10_000 and any("asked for 10000 presets" in n for n in many.notes)
    assert np.all(np.diff([p.cost for p in many.presets]) >= 0)
