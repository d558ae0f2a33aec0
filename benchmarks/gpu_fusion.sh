#!/usr/bin/env bash
# One hold for the fused (torch.compile) element-wise chains and the deferred top-p check (issue 5):
#   engine_graphs  graph replay vs eager decoding token for token (chains fused and plain in both), the eager
#                  engine vs each request alone (Supernet.generate), then compiled vs eager chains, fp32 and bf16
#   convert        the SmolLM2 teacher -> supernet (for the trace stage)
#   reference_no_cudnn  the eager engine vs Supernet.generate with SDPA kept off cuDNN's kernels
#   phases_B[_no_cudnn]  a fresh engine step by step (prefill, first decode steps, steady), chains fused
#                  everywhere / in graphs only (the default) / never; SDPA with and without cuDNN
#   traces         engine (graphs; fused and unfused chains) and Supernet.generate vs HF generate, batch 64-512,
#                  sampled with top-p (the engine decoding one step ahead without a host sync per step)
#   spec_check     speculative rounds whose draft steps replay CUDA graphs vs eager rounds, token for token
#   spec_*         15B shape: a speculative round's cost against plain target steps, draft steps replayed from
#                  graphs and eager (engine_spec.py), all-attention target at 32k x 8 and 16k x 16
#                  (SPEC_SET="32768 8;65000 4" picks the shapes, DRAFT_GRAPHS="on" the draft modes)
#   mix*           15B-shape mixed- vs single-preset batches at the largest sizes that fit, chains eager vs fused
#                  (MIX_SET="mix3 16384 45;mix3 4096 0" picks them, batch 0: the largest that fits;
#                  FUSION="on": fused chains only; a set named mix3s / mix4s: an engine per run with pools
#                  sized to its rows and thinned weights, engine_mixed.py --pools sized --thin)
#
#   bash benchmarks/gpu_fusion.sh RUN TEACHER          # e.g. TEACHER=/root/carry/teacher/...gguf
#   TINY=1 bash benchmarks/gpu_fusion.sh /tmp/fusion smollm2   # CPU smoke run (tiny shapes; GPU-only stages skipped)
#   GRAPH_PARTS="check reference" picks engine_graphs' parts; SKIP="stage ..." skips stages by name;
#   TRACE_METHODS="..." picks the traces' methods (serve_smollm2.py).
# Logs: RUN/<stage>.log, one line per stage in RUN/stages.log, "all done" at the end.
set -u
{ # one compound command: bash reads all of it before running it
RUN=$1 TEACHER=$2
TINY=${TINY:-0}
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
cd "$(dirname "$0")/.."
SKIP=" ${SKIP:-} "  # stage names to skip, e.g. SKIP="mix3_16384 mix4_16384"
stage() {
  local name=$1 t0=$SECONDS rc
  shift
  if [[ "$SKIP" == *" $name "* ]]; then echo "[$(date +%T)] skip  $name" | tee -a "$RUN/stages.log"; return; fi
  echo "[$(date +%T)] start $name" | tee -a "$RUN/stages.log"
  "$@" >"$RUN/$name.log" 2>&1
  rc=$?
  echo "[$(date +%T)] end   $name rc=$rc $((SECONDS - t0))s" | tee -a "$RUN/stages.log"
}
if [ "$TINY" = 1 ]; then
  TRACES=(--device cpu --trace-batches 2 --trace-tokens 8 --teacher supernet)
  PHASES=(--device cpu --tokens 8 --prompt 6) BATCHES=(2)
  MIXES=("mix3 64 3" "mix4 64 4") SHAPE=(--shape tiny --device cpu) FUSION=${FUSION:-off}
  SPECS=("64 2") SPEC=(--shape tiny --device cpu --ks 2)
else
  stage engine_graphs python benchmarks/engine_graphs.py --parts ${GRAPH_PARTS:-check reference fusion} --out "$RUN/engine_graphs.json"
  stage spec_check python benchmarks/engine_graphs.py --parts spec --out "$RUN/spec_check.json"
  TRACES=(--teacher "$TEACHER" --trace-batches 64 256 512 --profile)
  PHASES=(--profile-steps 4) BATCHES=(64 512)
  MIXES=("mix3 16384 45" "mix4 16384 20" "mix3 32768 27") SHAPE=(--graphs) FUSION=${FUSION:-off on}
  SPECS=("32768 8" "16384 16") SPEC=(--draft-graphs ${DRAFT_GRAPHS:-on off})
fi
[ -n "${MIX_SET:-}" ] && IFS=';' read -r -a MIXES <<<"$MIX_SET"
[ -n "${SPEC_SET:-}" ] && IFS=';' read -r -a SPECS <<<"$SPEC_SET"
stage convert python -m gearshift convert "$TEACHER" "$RUN/supernet" --window 256
# the eager engine against Supernet.generate with SDPA kept off cuDNN's kernels (ops/attention.py CUDNN_SDPA)
[ "$TINY" = 1 ] || stage reference_no_cudnn env GEARSHIFT_CUDNN_SDPA=0 python benchmarks/engine_graphs.py \
  --parts reference --out "$RUN/reference_no_cudnn.json"
for batch in "${BATCHES[@]}"; do
  for cudnn in auto 0; do
    name="phases_$batch$([ $cudnn = 0 ] && echo _no_cudnn)"
    stage "$name" env GEARSHIFT_CUDNN_SDPA=$cudnn python benchmarks/engine_phases.py "$RUN/supernet" "${PHASES[@]}" \
      --batch "$batch" --out "$RUN/$name.json"
  done
done
stage traces python benchmarks/serve_smollm2.py "$RUN/supernet" --skip-spec "${TRACES[@]}" \
  --trace-methods ${TRACE_METHODS:-engine_graphs engine_graphs_unfused supernet_generate} --out "$RUN/traces.json"
for spec in "${SPECS[@]}"; do
  read -r ctx batch <<<"$spec"
  stage "spec_$ctx" python benchmarks/engine_spec.py "${SPEC[@]}" --context "$ctx" --batch "$batch" \
    --out "$RUN/spec_$ctx.json"
done
for mix in "${MIXES[@]}"; do
  read -r set ctx batch <<<"$mix"
  presets=("Reg|Lklhd-26" "Reg|Lklhd-18" "Reg|Lklhd-10")
  [[ "$set" == mix4* ]] && presets=(all-attention "${presets[@]}")
  sized=()
  [[ "$set" == *s ]] && sized=(--pools sized --thin --batch-limit 256)
  stage "${set}_${ctx}_${batch}" python benchmarks/engine_mixed.py "${SHAPE[@]}" "${sized[@]}" --context "$ctx" \
    --batch "$batch" --presets "${presets[@]}" --fusion $FUSION --profile --profile-top 40 --out "$RUN/${set}_${ctx}_${batch}.json"
done
echo "[$(date +%T)] all done" | tee -a "$RUN/stages.log"
exit
}
