#!/usr/bin/env bash
# Reproduce the paper's Tables 1, 2 and 4: generate (cut.py) -> train (vlad.py) -> predict -> evaluate
# (metrics.py), chained only through folders. Every stage resumes when re-run; a finished stage is skipped.
#
#   bash reproduce.sh DATA AUX OUT
#
#   DATA  MVTec-layout root of the benchmark: MVTec AD, or VisA converted with `python data.py visa-to-mvtec`
#   AUX   MVTec-layout root of the auxiliary training set (VisA for MVTec AD, MVTec AD for VisA); '-' for none
#   OUT   working folder:
#           OUT/k<K>_seed<S>/normals_<category>.txt, generated/   the k normal images and CUT's samples, shared by
#                                                                every LOSS (Table 4 trains on the same samples)
#           OUT/k<K>_seed<S>/loss-<LOSS>/model/, predictions/, metrics.json
#           OUT/summary_k<K>_loss-<LOSS>.txt   mean +- std over seeds, with the paper's row and yours - paper
#
# Settings, as environment variables (defaults are the paper's protocol):
#   SHOTS         few-shot k values and/or 'all' (full-shot)                 default "1 2 4 all"
#   SEEDS         seeds of the k-shot selection and of training             default "0 1 2 3 4"
#   FULL_SEEDS    seeds for full-shot (nothing is sampled, one run suffices) default "0"
#   PROMPT        CUT's prompt                                              default "A photo of a {cls} that is damaged"
#   N_FEW, N_FULL samples generated per normal image, few-/full-shot        default 100 and 5
#   LOSS          Table 4 ablation: both | image | pixel (y_img, y_pix)     default both
#   DATASET       whose published numbers to print beside yours: mvtec | visa | auto (from the category names
#                 of DATA; neither's -> no paper row)                       default auto
#   TOKEN_CACHE   the frozen backbone's tokens, shared by every train call  default OUT/token_cache
#   EVICT_TOKENS  1: a run's generated images leave the cache once it is trained (the auxiliary ones stay), so
#                 it holds one run at a time (MVTec AD: 275 GB at most, not 884 GB); 0: keep all  default 1
#   CUT_ARGS      extra flags for cut.py  (e.g. "--model /path/to/sd15 --batch 4")
#   TRAIN_ARGS    extra flags for `vlad.py train` (e.g. "--model ViT-L-14-quickgelu --pretrained openai")
#   PREDICT_ARGS  extra flags for `vlad.py predict`
#   PYTHON        interpreter                                               default python
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
[ $# -eq 3 ] || { usage >&2; exit 2; }
DATA=$1 AUX=$2 OUT=$3
SHOTS=${SHOTS:-1 2 4 all}
SEEDS=${SEEDS:-0 1 2 3 4}
FULL_SEEDS=${FULL_SEEDS:-0}
PROMPT=${PROMPT:-A photo of a {cls\} that is damaged}
N_FEW=${N_FEW:-100}
N_FULL=${N_FULL:-5}
LOSS=${LOSS:-both}
DATASET=${DATASET:-auto}
TOKEN_CACHE=${TOKEN_CACHE:-$OUT/token_cache}
EVICT_TOKENS=${EVICT_TOKENS:-1}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
read -r -a cut_args <<<"${CUT_ARGS:-}"
read -r -a train_args <<<"${TRAIN_ARGS:-}"
read -r -a predict_args <<<"${PREDICT_ARGS:-}"

[ -d "$DATA" ] || { echo "error: $DATA: no such dataset folder." >&2; exit 2; }
[ "$AUX" = "-" ] || [ -d "$AUX" ] || { echo "error: $AUX: no such auxiliary dataset folder ('-' for none)." >&2; exit 2; }
case "$LOSS" in both | image | pixel) ;; *) echo "error: LOSS=$LOSS: expected both, image or pixel." >&2; exit 2 ;; esac
case "$DATASET" in mvtec | visa | auto) ;; *) echo "error: DATASET=$DATASET: expected mvtec, visa or auto." >&2; exit 2 ;; esac
case "$EVICT_TOKENS" in 1) evict=(--evict-data-tokens) ;; 0) evict=() ;; *) echo "error: EVICT_TOKENS=$EVICT_TOKENS: expected 1 or 0." >&2; exit 2 ;; esac
mkdir -p "$OUT"
mapfile -t categories < <("$PYTHON" "$HERE/data.py" info "$DATA" | tail -n +2 | awk '{print $1}')
aux_data=()
[ "$AUX" = "-" ] || aux_data=(--aux "$AUX")

for k in $SHOTS; do
  if [ "$k" = "all" ]; then seeds=$FULL_SEEDS n=$N_FULL; else seeds=$SEEDS n=$N_FEW; fi
  for seed in $seeds; do
    shot="$OUT/k${k}_seed${seed}"  # the k normal images and CUT's samples: the same for every LOSS
    run="$shot/loss-${LOSS}"
    echo "== k=$k seed=$seed loss=$LOSS -> $run"

    # 1. Generate: the k normal images of each category (recorded in normals_<category>.txt) -> anomalies,
    #    in one cut.py call (one model load) that reads each category from its DATA/<category>/train/good path.
    #    cut.py copies them to generated/<category>/train/good, so generated/ is a complete training set.
    #    Another LOSS finds them complete and generates nothing.
    images=()
    for category in "${categories[@]}"; do
      normals="$shot/normals_$category.txt"
      if [ ! -f "$normals" ]; then
        mkdir -p "$shot"
        "$PYTHON" "$HERE/data.py" k-shot "$DATA" "$category" "$k" --seed "$seed" >"$normals.tmp"
        mv "$normals.tmp" "$normals"
      fi
      while read -r image; do images+=(--image "$image"); done <"$normals"
    done
    "$PYTHON" "$HERE/cut.py" "${images[@]}" --prompt "$PROMPT" --n "$n" --seed 0 --out "$shot/generated" \
      "${cut_args[@]}"

    # 2. Train VLAD on the generated set (plus the auxiliary dataset's test split). The backbone's tokens of the
    #    auxiliary images are computed once for every run; those of the generated ones are evicted once the run
    #    is trained (EVICT_TOKENS=1), so another LOSS on the same samples recomputes them (7,575 images for
    #    Table 4 on MVTec AD: about a minute on a GPU) instead of the cache keeping 16 runs.
    "$PYTHON" "$HERE/vlad.py" train --data "$shot/generated" "${aux_data[@]}" --loss "$LOSS" --seed "$seed" \
      --out "$run/model" --resume --cache-dir "$TOKEN_CACHE" "${evict[@]}" "${train_args[@]}"

    # 3. Predict on the benchmark's test split with the same k normal images in the memory bank.
    "$PYTHON" "$HERE/vlad.py" predict --ckpt "$run/model" --data "$DATA" --k-shot "$k" --seed "$seed" \
      --out "$run/predictions" "${predict_args[@]}"

    # 4. Evaluate: I-AUC, I-F1, P-AUC, P-F1, PRO per category.
    if [ ! -f "$run/metrics.json" ]; then
      "$PYTHON" "$HERE/metrics.py" --pred "$run/predictions" --gt "$DATA" --json "$run/metrics.json"
    fi
  done

  # 5. Mean +- std over seeds, in the paper's format, with the paper's row beside it: Table 1 (k = 1, 2, 4),
  #    Table 2 (full-shot), Table 4 (k = 1 trained with y_img or y_pix only).
  case "$LOSS:$k" in
    both:1 | both:2 | both:4) paper=(--paper "$DATASET:k$k") ;;
    both:all) paper=(--paper "$DATASET:all") ;;
    image:1 | pixel:1) paper=(--paper "$DATASET:k1-$LOSS") ;;
    *) paper=(); echo "== the paper has no row for k=$k with LOSS=$LOSS" ;;
  esac
  mapfile -t results < <(ls "$OUT"/k"${k}"_seed*/loss-"${LOSS}"/metrics.json)
  summary="$OUT/summary_k${k}_loss-${LOSS}.txt"
  "$PYTHON" "$HERE/metrics.py" --summarize "${results[@]}" "${paper[@]}" >"$summary.tmp"
  if cmp -s "$summary.tmp" "$summary"; then rm "$summary.tmp"; else mv "$summary.tmp" "$summary"; fi
  echo "== k=$k, ${#results[@]} seed(s), loss $LOSS:"
  cat "$summary"
done
