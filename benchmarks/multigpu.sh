#!/usr/bin/env bash
# Several GPUs of one machine (issue 7): distillation with torchrun over all N GPUs vs one GPU at the same global
# batch -- tokens/s, scaling efficiency, loss curves side by side, peak memory per GPU -- for the SmolLM2
# supernet and a random-weight ~1B supernet (gearshift init --shape small-1b), each under DDP (whole replicas) and
# FSDP (parallel=fsdp: parameters, gradients and optimizer state sharded over the GPUs); then a placement
# measurement split over the GPUs (place measure --shard K/N, one process per GPU, place merge) against one GPU
# measuring them all.
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
# sequences per micro-batch (activation memory): a process runs PER_PROCESS_BATCH / micro micro-batches a step
micro_for() { if [ "$1" = small-1b ]; then echo "${MICRO_1B:-4}"; else echo "${MICRO:-16}"; fi; }
write_config() {  # NAME MODEL PER_PROCESS_BATCH PARALLEL MICRO
  python - "$RUN/$1.json" "$2" "$RUN/$1" "$3" "$STEPS" "$P" "$SEQ" "$4" "$5" <<'EOF'
import json, sys
from pathlib import Path
path, model, output, batch, steps, pipeline, seq, parallel, micro = sys.argv[1:]
micro = min(int(batch), int(micro))
json.dump({
    "parallel": parallel,
    "model": model,
    "output": output,
    "data": {"train": sorted(str(p) for p in Path(pipeline).glob("traces_*")), "seq_len": int(seq)},
    "optim": {"steps": int(steps), "batch_size": micro, "grad_accum": int(batch) // micro, "lr": 1e-3,
              "warmup_steps": 5, "seed": 0},
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
  write_config "${model}_1gpu" "$ckpt" "$GLOBAL" ddp "$(micro_for "$model")"
  run "${model}_1gpu" python -m gearshift distill "$RUN/${model}_1gpu.json" --device "$DEVICE"
  for parallel in ddp fsdp; do
    name=${model}_${N}gpu
    [ $parallel = fsdp ] && name=${model}_${N}gpu_fsdp
    write_config "$name" "$ckpt" $((GLOBAL / N)) $parallel "$(micro_for "$model")"
    run "$name" python -m torch.distributed.run --nproc_per_node "$N" --master_port "$((port++))" \
      -m gearshift distill "$RUN/$name.json" --device "$DEVICE"
  done
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
    one = rows(f"{model}_1gpu")
    entry = report["distill"][model] = {}
    if not one:
        entry["error"] = "the one-GPU run did not finish (see its log)"
        continue
    t1 = one[-1]["tokens_per_s"]
    entry.update(tokens_per_s_1gpu=t1, peak_mem_gb_1gpu=one[-1].get("peak_mem_gb"), loss_1gpu=[r["loss"] for r in one])
    for parallel, suffix in (("ddp", ""), ("fsdp", "_fsdp")):
        many = rows(f"{model}_{n}gpu{suffix}")
        if not many:
            entry[parallel] = {"error": "the run did not finish (see its log)"}
            continue
        tn = many[-1]["tokens_per_s"]
        entry[parallel] = {
            f"tokens_per_s_{n}gpu": tn, "tokens_per_s_per_gpu": tn / n, "scaling_efficiency": tn / (n * t1),
            f"loss_{n}gpu": [r["loss"] for r in many],
            "max_abs_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(one, many)),
            "peak_mem_gb_per_gpu": many[-1].get("peak_mem_gb"),
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
