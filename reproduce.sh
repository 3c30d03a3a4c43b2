#!/usr/bin/env bash
# Reproduce the paper's Tables 1, 2 and 4: generate (cut.py) -> train (vlad.py) -> predict -> evaluate
# (metrics.py), chained only through folders. Every stage resumes when re-run; a finished stage is skipped.
#
#   bash reproduce.sh DATA AUX OUT
#
#   DATA  MVTec-layout root of the benchmark: MVTec AD, or VisA converted with `python data.py visa-to-mvtec`
#   AUX   MVTec-layout root of the auxiliary training set (VisA for MVTec AD, MVTec AD for VisA); '-' for none
#   OUT   working folder:
#           OUT/seed<S>/generated/              CUT's samples of the k-shot images of every few-shot k of seed S,
#                                               N_FEW each, generated once: the k = 1 image is among the k = 2
#                                               ones, and so on, so k = 1 and 2 need no sample of their own
#           OUT/k<K>_seed<S>/normals_<category>.txt   the k normal images of each category
#           OUT/k<K>_seed<S>/generated/         the training set of those k images only, N_FEW samples each, as
#                                               links into seed<S>/generated (full-shot, kall_seed<S>: CUT's
#                                               samples themselves, N_FULL each); every LOSS trains on it
#           OUT/k<K>_seed<S>/loss-<LOSS>/model/, predictions/, metrics.json
#           OUT/summary_k<K>_loss-<LOSS>_seeds-<S1-S2-..>.txt   mean +- std over exactly the seeds of this call,
#                                               which it names, with the paper's row and yours - paper
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
#   EVICT_TOKENS  1: generated images leave the cache once the last run that trains on them is trained (for a
#                 seed's shared samples: its last few-shot k; the auxiliary ones stay), so it holds one seed or
#                 one full-shot run at a time (MVTec AD: 275 GB at most, not 580 GB); 0: keep all  default 1
#   CUT_ARGS      extra flags for cut.py  (e.g. "--model /path/to/sd15 --batch 4")
#   TRAIN_ARGS    extra flags for `vlad.py train` (e.g. "--model ViT-L-14-quickgelu --pretrained openai")
#   PREDICT_ARGS  extra flags for `vlad.py predict`
#   PYTHON        interpreter                                               default python
#
# Nothing mixes silently: DATA, PROMPT and CUT_ARGS are recorded in the settings.json of OUT/seed<S>, those and
# N_FEW (or N_FULL) in that of OUT/k<K>_seed<S>, and AUX, TRAIN_ARGS, PREDICT_ARGS and LOSS in that of each
# loss-<LOSS> folder, when the folder is first made. A call that would reuse a folder under another value stops
# before any work with one line naming the setting and both values: set it back, or use another OUT (a change is
# refused, never redone: a redo would delete the samples). Flags are compared as written, as a changed flag may
# change the results; one that only changes speed (such as cut.py's --batch) can be changed by editing it in
# those settings.json files. A run is finished once its metrics.json is written, and a later call skips it.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
fail() { echo "error: $*" >&2; exit 2; }
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

[ -d "$DATA" ] || fail "$DATA: no such dataset folder."
[ ! -e "$OUT" ] || [ -d "$OUT" ] || fail "$OUT: is a file, not a folder; choose a folder for OUT."
[ "$AUX" = "-" ] || [ -d "$AUX" ] || fail "$AUX: no such auxiliary dataset folder ('-' for none)."
case "$LOSS" in both | image | pixel) ;; *) fail "LOSS=$LOSS: expected both, image or pixel." ;; esac
case "$DATASET" in mvtec | visa | auto) ;; *) fail "DATASET=$DATASET: expected mvtec, visa or auto." ;; esac
case "$EVICT_TOKENS" in 0 | 1) ;; *) fail "EVICT_TOKENS=$EVICT_TOKENS: expected 1 or 0." ;; esac
for k in $SHOTS; do
  [[ $k =~ ^([1-9][0-9]*|all)$ ]] || fail "SHOTS: '$k' is neither a positive whole number nor 'all'."
done
for seed in $SEEDS $FULL_SEEDS; do
  [[ $seed =~ ^[0-9]+$ ]] || fail "SEEDS or FULL_SEEDS: '$seed' is not a whole number."
done
for name in SHOTS SEEDS FULL_SEEDS; do
  twice=$(printf '%s\n' ${!name} | sort | uniq -d | head -n 1)
  [ -z "$twice" ] || fail "$name: '$twice' is given twice."
done
for name in N_FEW N_FULL; do
  [[ ${!name} =~ ^[1-9][0-9]*$ ]] || fail "$name=${!name}: expected a positive whole number."
done

few=() full=0
for k in $SHOTS; do if [ "$k" = all ]; then full=1; else few+=("$k"); fi; done
names=$("$PYTHON" "$HERE/data.py" categories "$DATA")  # one a line: names with spaces stay whole
mapfile -t categories <<<"$names"
aux_data=() aux_root=-
[ "$AUX" = "-" ] || aux_data=(--aux "$AUX") aux_root=$(cd "$AUX" && pwd -P)

# Record (or compare with the record of) the settings of every folder this call will use, before any work.
data_root=$(cd "$DATA" && pwd -P)  # absolute: the recorded normal images are found from any working folder
generation=("DATA=$data_root" "PROMPT=$PROMPT" "CUT_ARGS=${CUT_ARGS:-}")
training=("AUX=$aux_root" "TRAIN_ARGS=${TRAIN_ARGS:-}" "PREDICT_ARGS=${PREDICT_ARGS:-}" "LOSS=$LOSS")
stages=()
for k in "${few[@]}"; do
  for seed in $SEEDS; do
    stages+=(--stage "$OUT/seed$seed" "${generation[@]}" --stage "$OUT/k${k}_seed$seed" "${generation[@]}"
             "N_FEW=$N_FEW" --stage "$OUT/k${k}_seed$seed/loss-$LOSS" "${training[@]}")
  done
done
if [ "$full" = 1 ]; then
  for seed in $FULL_SEEDS; do
    stages+=(--stage "$OUT/kall_seed$seed" "${generation[@]}" "N_FULL=$N_FULL"
             --stage "$OUT/kall_seed$seed/loss-$LOSS" "${training[@]}")
  done
fi
[ ${#stages[@]} -eq 0 ] || "$PYTHON" "$HERE/data.py" settings "${stages[@]}"

# The k normal images of each category for a seed (recorded once in OUT/k<K>_seed<S>/normals_<category>.txt,
# chosen by data.select_k_shot as `vlad.py predict` chooses its memory bank): sets images=(--image PATH ...).
normals_of() {
  local shot="$OUT/k$1_seed$2" category image
  images=()
  for category in "${categories[@]}"; do
    [ -f "$shot/normals_$category.txt" ] ||
      "$PYTHON" "$HERE/data.py" k-shot "$data_root" "$category" "$1" --seed "$2" --out "$shot/normals_$category.txt"
    while IFS= read -r image; do images+=(--image "$image"); done <"$shot/normals_$category.txt"
  done
}

# Steps 2 to 4 of one run (SHOT K SEED, then extra `vlad.py train` flags). A run is finished once its
# metrics.json is written: a later call skips it, its generation included, and loads no model.
train_predict_evaluate() {
  local shot=$1 k=$2 seed=$3 run="$1/loss-$LOSS"
  shift 3
  echo "== k=$k seed=$seed loss=$LOSS -> $run"
  # 2. Train VLAD on the k images' samples (plus the auxiliary dataset's test split), with one token cache for
  #    every run: the tokens of an image are computed once, and the auxiliary images' serve every run.
  "$PYTHON" "$HERE/vlad.py" train --data "$shot/generated" "${aux_data[@]}" --loss "$LOSS" --seed "$seed" \
    --out "$run/model" --resume --cache-dir "$TOKEN_CACHE" "$@" "${train_args[@]}"
  # 3. Predict on the benchmark's test split with the same k normal images in the memory bank.
  "$PYTHON" "$HERE/vlad.py" predict --ckpt "$run/model" --data "$DATA" --k-shot "$k" --seed "$seed" \
    --out "$run/predictions" "${predict_args[@]}"
  # 4. Evaluate: I-AUC, I-F1, P-AUC, P-F1, PRO per category.
  "$PYTHON" "$HERE/metrics.py" --pred "$run/predictions" --gt "$DATA" --json "$run/metrics.json"
}

# Few-shot, seed by seed. 1. Generate once for the seed: the normal images of every k whose run is not finished
# (each image once; one cut.py call, one model load, reading each category from its DATA/<category>/train/good
# path). Another k or another LOSS finds the samples it shares complete and generates nothing.
for seed in $SEEDS; do
  [ ${#few[@]} -gt 0 ] || break
  todo=()
  for k in "${few[@]}"; do [ -f "$OUT/k${k}_seed$seed/loss-$LOSS/metrics.json" ] || todo+=("$k"); done
  if [ ${#todo[@]} -eq 0 ]; then
    echo "== seed=$seed: the runs of k = ${few[*]} with loss $LOSS are finished"
    continue
  fi
  pool="$OUT/seed$seed/generated"
  union=()
  for k in "${todo[@]}"; do normals_of "$k" "$seed"; union+=("${images[@]}"); done
  echo "== seed=$seed: CUT's samples of the normal images of k = ${todo[*]} -> $pool"
  "$PYTHON" "$HERE/cut.py" "${union[@]}" --prompt "$PROMPT" --n "$N_FEW" --seed 0 --out "$pool" "${cut_args[@]}"
  for i in "${!todo[@]}"; do
    k=${todo[$i]} shot="$OUT/k${todo[$i]}_seed$seed"
    # Each k trains on its own k images' samples only: N_FEW x k per category, linked from the seed's samples,
    # so the token cache finds the very files an earlier k of the seed cached. They leave the cache after the
    # seed's last k (EVICT_TOKENS=1), as no later run trains on them; another LOSS computes them again.
    normals_of "$k" "$seed"
    "$PYTHON" "$HERE/data.py" link-samples "$pool" "$shot/generated" --n "$N_FEW" "${images[@]}"
    evict=()
    [ "$EVICT_TOKENS" = 0 ] || [ $((i + 1)) -lt ${#todo[@]} ] || evict=(--evict-tokens "$pool")
    train_predict_evaluate "$shot" "$k" "$seed" "${evict[@]}"
  done
done

# Full-shot: every normal image, N_FULL samples each, generated into the run's own folder.
for seed in $FULL_SEEDS; do
  [ "$full" = 1 ] || break
  shot="$OUT/kall_seed$seed"
  if [ -f "$shot/loss-$LOSS/metrics.json" ]; then
    echo "== seed=$seed: the full-shot run with loss $LOSS is finished"
    continue
  fi
  normals_of all "$seed"
  "$PYTHON" "$HERE/cut.py" "${images[@]}" --prompt "$PROMPT" --n "$N_FULL" --seed 0 --out "$shot/generated" \
    "${cut_args[@]}"
  evict=()
  [ "$EVICT_TOKENS" = 0 ] || evict=(--evict-tokens "$shot/generated")
  train_predict_evaluate "$shot" all "$seed" "${evict[@]}"
done

# 5. Mean +- std over exactly the seeds of this call, in the paper's format, with the paper's row beside it:
#    Table 1 (k = 1, 2, 4), Table 2 (full-shot), Table 4 (k = 1 trained with y_img or y_pix only).
for k in $SHOTS; do
  if [ "$k" = all ]; then read -r -a seeds <<<"$FULL_SEEDS"; else read -r -a seeds <<<"$SEEDS"; fi
  [ ${#seeds[@]} -gt 0 ] || continue
  case "$LOSS:$k" in
    both:1 | both:2 | both:4) paper=(--paper "$DATASET:k$k") ;;
    both:all) paper=(--paper "$DATASET:all") ;;
    image:1 | pixel:1) paper=(--paper "$DATASET:k1-$LOSS") ;;
    *) paper=(); echo "== the paper has no row for k=$k with LOSS=$LOSS" ;;
  esac
  results=()
  for seed in "${seeds[@]}"; do results+=("$OUT/k${k}_seed$seed/loss-$LOSS/metrics.json"); done
  summary="$OUT/summary_k${k}_loss-${LOSS}_seeds-$(IFS=-; echo "${seeds[*]}").txt"
  temporary="$OUT/.${summary##*/}.tmp"
  { echo "k=$k, loss $LOSS, seeds ${seeds[*]}: $OUT/k${k}_seed<S>/loss-$LOSS/metrics.json"
    "$PYTHON" "$HERE/metrics.py" --summarize "${results[@]}" "${paper[@]}"; } >"$temporary"
  if cmp -s "$temporary" "$summary"; then rm "$temporary"; else mv "$temporary" "$summary"; fi
  echo "== $summary:"
  cat "$summary"
done
