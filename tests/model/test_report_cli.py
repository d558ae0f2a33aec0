"""The cost report (checked by hand) and the command line."""

import json

import pytest
import torch

from gearshift.cli import main
from gearshift.config import SupernetConfig
from gearshift.demo import MARKER
from gearshift.placement import PlacementError, spread_placement
from gearshift.roofline import PAPER_PRESETS, batch_bytes_per_step, paper_placement, placement_report


def test_report_by_hand(tiny_config):
    c = tiny_config
    d, hkv, layers, ctx = 16, 2, 4, 10
    r = placement_report(c, "FSGK", context=ctx, batch=3, dtype_bytes=2)
    kv = lambda n: 2 * hkv * d * n * 2  # noqa: E731 - K and V, bf16
    gdn = 4 * 16 * 16 * 4 + 3 * (2 * 2 * 16 + 4 * 16) * 2  # fp32 state + conv tail over [q|k|v]
    kda = 4 * 16 * 16 * 4 + 3 * 3 * 4 * 16 * 2
    window = c.layers[0].mixers["sliding_window"].window_size
    assert r.state_bytes_per_seq == kv(ctx) + kv(min(ctx, window)) + gdn + kda
    write = 2 * hkv * d * 2
    per_seq = kv(ctx) + write + kv(min(ctx, window)) + write + 2 * gdn + 2 * kda
    embed = c.vocab_size * c.hidden_size
    weights = (r.active_params - embed + 3 * c.hidden_size) * 2  # untied: 3 embedding rows + the full head
    assert r.bytes_per_step == weights + 3 * per_seq
    assert r.roofline_ms == pytest.approx(r.bytes_per_step / 4.3e12 * 1e3)
    assert r.composition == {"attention": 1, "sliding_window": 1, "gdn": 1, "kda": 1}
    assert r.stored_params > r.active_params
    assert layers == c.num_layers


def test_mixed_batch_reads_every_mixer_in_use_once(tiny_config):
    """A batch of one placement costs what placement_report says; a mix reads the weights of every mixer in
    use once and each row's own state: FFFF + GGGG = shared + all FA + all GDN weights, + one row of each."""
    c, ctx = tiny_config, 10
    single = placement_report(c, "FFFF", context=ctx, batch=3).bytes_per_step
    assert batch_bytes_per_step(c, ["FFFF"] * 3, context=ctx) == single
    fa, gdn = (placement_report(c, p, context=ctx, batch=1) for p in ("FFFF", "GGGG"))
    shared = fa.active_params - _mixer_params(c, "attention")
    embed = c.vocab_size * c.hidden_size
    params = shared + _mixer_params(c, "attention") + _mixer_params(c, "gdn")
    weights = (params - embed + 2 * c.hidden_size + (embed if c.tie_word_embeddings else 0)) * 2
    state = lambda r: r.bytes_per_step - r.weight_bytes_per_step  # noqa: E731 - one row's state traffic
    assert batch_bytes_per_step(c, ["FFFF", "GGGG"], context=ctx) == weights + state(fa) + state(gdn)


def _mixer_params(config, name: str) -> int:
    from gearshift.model import Supernet

    model = Supernet(config)
    return sum(p.numel() for block in model.blocks for p in block.mixer.mixers[name].parameters())


def test_15b_shape_parameter_counts():
    r = placement_report(SupernetConfig.apriel_15b(), "all-attention", context=32768)
    assert 24e9 < r.stored_params < 26e9  # ~25B stored (paper.md)
    assert 14e9 < r.active_params < 16e9  # ~15B active


def test_spread_placement_and_paper_presets():
    assert spread_placement({"attention": 2, "gdn": 2}, 4) == "FGFG"
    for name, (counts, _, _) in PAPER_PRESETS.items():
        p = paper_placement(name)
        assert (p.count("F"), p.count("S"), p.count("K"), p.count("G")) == counts
    assert len(paper_placement("Reg|Lklhd-10", 8)) == 8
    with pytest.raises(PlacementError):
        spread_placement({"attention": 3}, 4)


def test_cli_demo(tmp_path, capsys):
    """Item 10 of issue 24: the demo starts clean each run (no reused traces, no resumed checkpoints) and its verdict
    is the conjunction of checks that can fail, among them that training lowered the KL."""
    out_dir = tmp_path / "demo"
    out_dir.mkdir()
    (out_dir / MARKER).write_text("")  # a previous demo's output ...
    (out_dir / "traces").mkdir()  # ... whose traces the new run must not reuse
    (out_dir / "traces" / "index.json").write_text("stale")
    code = main(["demo", "--out", str(out_dir), "--steps", "6", "--align-steps", "4"])
    out = capsys.readouterr().out
    summary = json.loads((out_dir / "summary.json").read_text())
    checks = summary["checks"]
    assert code == (0 if all(checks.values()) else 1), checks
    assert ("all checks passed" in out) == all(checks.values()) and ("FAILED" in out) != all(checks.values())
    assert "teacher traces: 400 sequences" in out
    assert summary["exact_decoding_worst"] < 1e-4 and summary["teacher_gap"] < 1e-4 and summary["engine_mixed_ok"]
    # the checks compare numbers the run produced: the frozen sliding window is untouched, training helped
    before, after = summary["kl_before"], summary["kl_after"]
    assert checks["frozen sliding window unchanged"]
    assert checks["training lowered the KL of all-gdn, all-kda, FSGK"] == all(
        after[p]["kl"] < before[p]["kl"] for p in ("all-gdn", "all-kda", "FSGK")
    )
    assert (out_dir / "supernet" / "model.safetensors").exists() and (out_dir / "thinned" / "presets.json").exists()
    # a directory that is not a demo's own output is never cleared
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(other)]) == 2
    assert "not a demo's output" in capsys.readouterr().err and (other / "notes.txt").exists()


def test_cli_commands(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["init", str(ckpt), "--shape", "tiny"]) == 0
    assert main(["preset", "add", str(ckpt), "fast", "GGGK"]) == 0
    assert main(["info", str(ckpt)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split() == ["preset", "placement", "F/S/G/K", "speed-up", "quality", "note"]
    assert table[-1].split() == ["fast", "GGGK", "0/0/3/1", "-", "-"]
    assert main(["report", str(ckpt), "--placement", "fast", "--context", "64", "128", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in rows] == [64, 128] and rows[0]["placement"] == "GGGK"
    assert (
        main(
            ["generate", str(ckpt), "--placement", "fast", "--ids", "1,2,3", "--max-new-tokens", "4", "--device", "cpu"]
        )
        == 0
    )
    ids = json.loads(capsys.readouterr().out.strip())
    # the command decodes through the serving engine: greedy, it gives generate's tokens
    from gearshift.model import Supernet

    reference = Supernet.from_pretrained(ckpt).generate([[1, 2, 3]], "GGGK", max_new_tokens=4, eos_token_id=[])
    stop = Supernet.from_pretrained(ckpt).config.eos_token_id
    assert ids == reference[0, 3:].tolist()[: len(ids)] and (
        len(ids) == 4 or ids[-1] in (stop or []) or ids[-1] == stop
    )
    assert main(["generate", str(ckpt), "--ids", "1,2,3", "--max-new-tokens", "600", "--device", "cpu"]) == 2
    assert "exceed the model's context" in capsys.readouterr().err
    assert main(["thin", str(ckpt), str(tmp_path / "thin"), "--placement", "fast"]) == 0
    assert main(["generate", str(ckpt), "--placement", "XYZW", "--ids", "1", "--device", "cpu"]) == 2
    assert "unknown preset or placement" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert main(["preset", "remove", str(ckpt), "nope"]) == 2
    torch.manual_seed(0)


def test_throughput_benchmark_runs_on_cpu(tmp_path):
    """The GPU benchmark's CPU smoke path: each placement thinned to its own weights, through the engine, batch 1
    and the largest batch the state budget holds (searched past the engine's default queue bound), prefill,
    speed-ups against all-FA, JSON out."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
    out = tmp_path / "tp.json"
    args = ["--shape", "tiny", "--device", "cpu", "--contexts", "24", "--steps", "1", "--batch-limit", "8"]
    args += ["--state-mb", "0.3", "--only", "all-SWA", "Reg|Lklhd-10", "--out", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    assert {r["placement"] for r in rows} == {"all-FA", "all-SWA", "Reg|Lklhd-10"}
    largest = {r["placement"]: r["batch"] for r in rows if r["kind"] == "max"}
    # in the same state budget, a window's ring and recurrent state hold more rows than full attention's KV
    assert 1 <= largest["all-FA"] < largest["all-SWA"] <= 8 and largest["Reg|Lklhd-10"] > largest["all-FA"]
    assert all(r["speedup_vs_FA"] == 1.0 for r in rows if r["placement"] == "all-FA")
    assert all(r["of_roofline"] > 0 for r in rows if r["kind"] != "prefill")
    assert "\\|Lklhd-10" in done.stdout  # the Markdown table escapes the paper names' pipe
    assert {r["kind"] for r in rows} == {"batch1", "max", "prefill"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert next(r for r in rows if r["placement"] == "all-FA" and r["kind"] == "max")["speedup_vs_FA"] == 1.0
