#!/usr/bin/env bash
# Several GPUs of one machine (issue 7): distillation with torchrun over all N GPUs vs one GPU at the same global
# batch -- tokens/s, scaling efficiency, loss curves side by side, peak memory per GPU -- for the SmolLM2
# supernet and a random-weight ~1B supernet (gearshift init --shape small-1b); then a placement measurement split
# over the GPUs (place measure --shard K/N, one process per GPU, place merge) against one GPU measuring them all.
# Training is DDP (every GPU holds the whole supernet: 0.5 GB of bf16 weights for SmolLM2, 3.2 GB for the 1B
# shape, far below an H200's memory, so sharding would only add communication).
#
#   bash benchmarks/multigpu.sh RUN PIPELINE_DIR [STEPS]     # PIPELINE_DIR from benchmarks/pipeline_smollm2.py
#   NGPU=2 DEVICE=cpu MODELS=smollm2 SEQ=64 bash benchmarks/multigpu.sh /tmp/mg /tmp/pipeline 2   # CPU smoke (gloo)
# Results: RUN/multigpu.json (+ RUN/<run>/metrics.jsonl, RUN/stages.log).
set -u
{ # one compound command: bash reads all of it before running it
RUN=$1 P=$2 STEPS=${3:-40}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-smollm2 small-1b}
SEQ=${SEQ:-1024}
N=${NGPU:-$(nvidia-smi -L | wc -l)}
mkdir -p "$RUN"
cd "$(dirname "$0")/.."
log() { echo "[$(date +%T)] $*" | tee -a "$RUN/stages.log"; }
run() {
  local name=$1 t0=$SECONDS
  shift
  log "start $name"
  "$@" >"$RUN/$name.log" 2>&1
  log "end   $name rc=$? $((SECONDS - t0))s"
}
port=$((29500 + RANDOM % 1000))

# distill configs: the same global batch (16 sequences of 1024 tokens) on 1 and on N processes
write_config() {  # NAME MODEL PER_PROCESS_BATCH
  python - "$RUN/$1.json" "$2" "$RUN/$1" "$3" "$STEPS" "$P" "$SEQ" <<'EOF'
import json, sys
from pathlib import Path
path, model, output, batch, steps, pipeline, seq = sys.argv[1:]
json.dump({
    "model": model,
    "output": output,
    "data": {"train": sorted(str(p) for p in Path(pipeline).glob("traces_*")), "seq_len": int(seq)},
    "optim": {"steps": int(steps), "batch_size": int(batch), "lr": 1e-3, "warmup_steps": 5, "seed": 0},
    "sampler": {"kind": "uniform"},
    "loss": {"activation": 0.5, "reverse_kl": 1.0, "forward_kl": 0.5},
    "eval": {"every": 0},
    "checkpoint": {"every": 0},
    "log_every": 1,
}, open(path, "w"), indent=1)
EOF
}
GLOBAL=16
[ "$DEVICE" = cpu ] && GLOBAL=4
if [[ " $MODELS " == *" small-1b "* ]]; then
  python -m gearshift init "$RUN/small-1b" --shape small-1b --dtype float32 --device cpu >"$RUN/init.log" 2>&1 \
    || log "init small-1b failed (see init.log)"
fi
for model in $MODELS; do
  ckpt=$P/supernet
  [ "$model" = small-1b ] && ckpt=$RUN/small-1b
  write_config "${model}_1gpu" "$ckpt" "$GLOBAL"
  write_config "${model}_${N}gpu" "$ckpt" $((GLOBAL / N))
  run "${model}_1gpu" python -m gearshift distill "$RUN/${model}_1gpu.json" --device "$DEVICE"
  run "${model}_${N}gpu" python -m torch.distributed.run --nproc_per_node "$N" --master_port "$port" \
    -m gearshift distill "$RUN/${model}_${N}gpu.json" --device "$DEVICE"
done

# placement measurement: one process over all placements vs N processes (one per GPU) over shards, merged
M=(--data "$P/eval_traces" --placements stratified:48 --sequences 32 --max-len "$SEQ" --device "$DEVICE")
run measure_1gpu python -m gearshift place measure "$P/supernet" "${M[@]}" --out "$RUN/measure_1gpu.jsonl"
log "start measure_${N}gpu"
for ((k = 0; k < N; k++)); do
  if [ "$DEVICE" = cpu ]; then visible=""; else visible=$k; fi
  CUDA_VISIBLE_DEVICES=${visible:-${CUDA_VISIBLE_DEVICES:-}} python -m gearshift place measure "$P/supernet" \
    "${M[@]}" --shard "$k/$N" --out "$RUN/measure_part$k.jsonl" >"$RUN/measure_part$k.log" 2>&1 &
done
wait
log "end   measure_${N}gpu"
run merge python -m gearshift place merge "$RUN"/measure_part*.jsonl --out "$RUN/measure_${N}gpu.jsonl"

python - "$RUN" "$N" $MODELS <<'EOF'
import json, sys
from pathlib import Path
run, n, models = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def rows(name):
    path = run / name / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if '"loss"' in x] if path.exists() else []
report = {"gpus": n, "distill": {}, "measure": {}}
for model in models:
    one, many = rows(f"{model}_1gpu"), rows(f"{model}_{n}gpu")
    if not (one and many):
        report["distill"][model] = {"error": "a run did not finish (see its log)"}
        continue
    t1, tn = one[-1]["tokens_per_s"], many[-1]["tokens_per_s"]
    report["distill"][model] = {
        "tokens_per_s_1gpu": t1, f"tokens_per_s_{n}gpu": tn, "tokens_per_s_per_gpu": tn / n,
        "scaling_efficiency": tn / (n * t1),
        "loss_1gpu": [r["loss"] for r in one], f"loss_{n}gpu": [r["loss"] for r in many],
        "max_abs_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(one, many)),
        "peak_mem_gb_1gpu": one[-1].get("peak_mem_gb"), f"peak_mem_gb_per_gpu_{n}gpu": many[-1].get("peak_mem_gb"),
    }
def table(name):
    path = run / name
    if not path.exists():
        return {}
    return {r["placement"]: r for r in map(json.loads, path.read_text().splitlines()[1:]) if r.get("placement")}
a, b = table("measure_1gpu.jsonl"), table(f"measure_{n}gpu.jsonl")
if a and b:
    common = sorted(set(a) & set(b))
    report["measure"] = {
        "placements_1gpu": len(a), f"placements_{n}gpu": len(b), "common": len(common),
        "max_abs_diff": {m: max(abs(a[p][m] - b[p][m]) for p in common) for m in ("loglik", "kl", "agreement")},
        "seconds_1gpu": sum(r["seconds"] for r in a.values()),
    }
(run / "multigpu.json").write_text(json.dumps(report, indent=1))
print(json.dumps({k: v for k, v in report.items()}, indent=1)[:3000])
EOF
exit
}
