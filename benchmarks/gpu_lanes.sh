#!/usr/bin/env bash
# One hold for the engine measurements that need no training (issue 5) and, on a machine with two or more GPUs,
# the multi-GPU runs (issue 7), in two lanes side by side, then all GPUs together:
#   lane A, GPU 0  (2+ GPUs) the SmolLM2 pipeline, short (MINUTES=1): converted supernet + teacher traces
#   lane B, GPU 1  (GPU 0 on a one-GPU machine) gpu_session.sh without its training stages (convert, the split-KV
#                  graph check, the 15B mixed batches, engine vs HF trace throughput), then 15B mixes at the
#                  largest batch that fits: the paper's four presets, and its three mixes without all-attention
#                  (where each row's state outweighs the extra mixers' weights sooner)
#   all GPUs       (2+ GPUs) multigpu.sh on lane A's pipeline: distillation on 1 vs N GPUs (DDP, FSDP), sharded
#                  placement measurement
#
#   bash benchmarks/gpu_lanes.sh RUN TEACHER         # e.g. TEACHER=/root/carry/teacher/...gguf
#   TINY=1 bash benchmarks/gpu_lanes.sh /tmp/lanes smollm2   # CPU smoke run (tiny shapes, gloo; NGPU=1: lane B only)
# Logs: RUN/lanes.log, RUN/a (pipeline), RUN/b (gpu_session.sh's RUN), RUN/mg (multigpu.sh's RUN).
set -u
{ # one compound command: bash reads all of it before running it
RUN=$1 TEACHER=$2
TINY=${TINY:-0}
mkdir -p "$RUN/a" "$RUN/b/shape15b"
RUN=$(cd "$RUN" && pwd)
cd "$(dirname "$0")/.."
log() { echo "[$(date +%T)] $*" | tee -a "$RUN/lanes.log"; }
if [ "$TINY" = 1 ]; then
  PIPE=(--tiny --trace-rounds 2 --device cpu) MIX=(--shape tiny --device cpu) CTXS=(64 128)
  export DEVICE=cpu NGPU=${NGPU:-2} MODELS=smollm2 SEQ=64
  GPU_A="" GPU_B=""
else
  PIPE=(--minutes "${MINUTES:-1}" --trace-rounds 2) MIX=(--graphs) CTXS=(16384 32768)
  NGPU=$(nvidia-smi -L | wc -l)
  GPU_A=0 GPU_B=$((NGPU > 1 ? 1 : 0))
fi
LANE_A=1
[ "${NGPU:-1}" -lt 2 ] && LANE_A=0
SKIP_B="pipeline evals_tasks evals_niah evals_report engine_16384 engine_32768 serve_spec serve_spec_fp32"
SKIP_B="$SKIP_B place_measure place_cost place_fit_r1 place_fit_r2 place_optimize evals_teacher cost15b_4096"
SKIP_B="$SKIP_B cost15b_16384 cost15b_64 cost15b_128"

log "start lane B (engine)$([ $LANE_A = 1 ] && echo ' and lane A (pipeline)')"
if [ $LANE_A = 1 ]; then (
  CUDA_VISIBLE_DEVICES=$GPU_A python benchmarks/pipeline_smollm2.py --teacher "$TEACHER" --out "$RUN/a/pipeline" \
    "${PIPE[@]}" >"$RUN/a/pipeline.log" 2>&1
  log "end   lane A rc=$?"
) & fi
(
  export CUDA_VISIBLE_DEVICES=$GPU_B
  TINY=$TINY SKIP=$SKIP_B bash benchmarks/gpu_session.sh "$RUN/b" "$TEACHER" none none >"$RUN/b/driver.log" 2>&1
  for ctx in "${CTXS[@]}"; do
    for set in mix3 mix4; do
      presets=("Reg|Lklhd-26" "Reg|Lklhd-18" "Reg|Lklhd-10")
      [ $set = mix4 ] && presets=(all-attention "${presets[@]}")
      t0=$SECONDS
      python benchmarks/engine_mixed.py "${MIX[@]}" --context "$ctx" --batch 0 --presets "${presets[@]}" \
        --out "$RUN/b/shape15b/engine_${set}_max_$ctx.json" >"$RUN/b/engine_${set}_max_$ctx.log" 2>&1
      log "end   engine_${set}_max_$ctx rc=$? $((SECONDS - t0))s"
    done
  done
  log "end   lane B"
) &
wait
if [ $LANE_A = 1 ]; then
  log "start multigpu"
  bash benchmarks/multigpu.sh "$RUN/mg" "$RUN/a/pipeline" "${STEPS:-$([ "$TINY" = 1 ] && echo 2 || echo 30)}" \
    >"$RUN/mg.log" 2>&1
  log "end   multigpu rc=$?"
fi
log "all done"
exit
}
