# Sourced by compression_bench.sh, compression_sim.sh and train_tiny.sh: the task issue 13's compression
# accuracy is measured on, as one train_tiny.sh variant "name:train.py flags" (TASK_VARIANT), its
# checkpoint (TASK_CKPT), make_eval's regime (TASK_REGIME) and its flags (TASK_EVAL_ARGS).
# COMPRESS_TASK:
#   counts (default)  layout b, one 16 x 16 grid (COUNTS_CELLS; 256 image tokens, at most 3 cells of each of 4 colours),
#                     "How many red, green, blue and yellow cells are there?" -> "2 0 3 1"; regime C;
#                     prompts of 296..396 tokens (mean 352), 21 after the image: alpha 0.1 keeps ~14
#                     beyond them, as many as an image's coloured cells               /tmp/tiny-counts
#   present           layout b, one 16 x 16 grid (COUNTS_CELLS), 6 colours at most twice each (at most 12
#                     coloured cells), "Which colours are in the image?" -> "red blue purple"; regime C:
#                     a presence is carried by any one cell (retrieval), a count by all (aggregation)
#                                                                                     /tmp/tiny-present
#   present2x         present at twice the resolution: 56-px cells, each 2 x 2 image tokens (1024 per
#                     image, prompts of ~1100): a real image's redundancy (one object spans many
#                     patches), where alpha 0.1 keeps ~110 tokens, ~95 beyond the 15 after the image,
#                     for at most 12 coloured cells; present's prompts (~340) leave ~19 /tmp/tiny-present2x
#   rows              ROW_IMAGES (default 6) images and a row question:
#                     1: layout b, "What are the colours of row r, left to right?"     /tmp/tiny-rows
#                     K 2..6: layout mrow, K labelled images, "... of row r of image i ..."  /tmp/tiny-mrowsK
#                     The row checkpoints trained so far never learned rows (they answer the all-white
#                     row, right as often as a row is empty): kept to reproduce those runs.
# One place for the flags, so a checkpoint train_tiny.sh left is the one compression_bench.sh would train.
ROW_IMAGES=${ROW_IMAGES:-6}  # here only: every script that sources this trains and reads the same K
case "${COMPRESS_TASK:-counts}" in
  counts)
    # COUNTS_CELLS (default 16) is the grid side; 16 is the smallest at which alpha 0.1 keeps as many
    # tokens beyond the tail as an image can have coloured cells (12).
    TASK_VARIANT="counts:--layers 8 --layouts b:1 --kinds-b counts:1 --cells ${COUNTS_CELLS:-16} --max-count 3"
    TASK_REGIME=C; TASK_EVAL_ARGS="" ;;
  present)
    TASK_VARIANT="present:--layers 8 --layouts b:1 --kinds-b present:1 --cells ${COUNTS_CELLS:-16} --colours 6 --max-count 2"
    TASK_REGIME=C; TASK_EVAL_ARGS="" ;;
  present2x)
    TASK_VARIANT="present2x:--layers 8 --layouts b:1 --kinds-b present:1 --cells ${COUNTS_CELLS:-16} --cell-px 56 --colours 6 --max-count 2"
    TASK_REGIME=C; TASK_EVAL_ARGS="" ;;
  rows)
    case "$ROW_IMAGES" in
      1) TASK_VARIANT="rows:--layers 8 --layouts b:1 --kinds-b row:0.6,cell:0.2,count:0.2 --route-p-ref 0" ;;
      [2-6]) TASK_VARIANT="mrows$ROW_IMAGES:--layers 8 --layouts mrow:1 --row-images $ROW_IMAGES" ;;
      *) echo "ROW_IMAGES must be 1..6, got '$ROW_IMAGES'" >&2; return 1 2>/dev/null || exit 1 ;;
    esac
    TASK_REGIME=R; TASK_EVAL_ARGS="--row-images $ROW_IMAGES" ;;
  *) echo "COMPRESS_TASK must be counts, present, present2x or rows, got '$COMPRESS_TASK'" >&2; return 1 2>/dev/null || exit 1 ;;
esac
TASK_CKPT=/tmp/tiny-${TASK_VARIANT%%:*}

train_task_checkpoint() {  # LOG: train TASK_CKPT for MINUTES (train.py's output in LOG), unless REUSE_CKPT=1 finds it
  if [ "${REUSE_CKPT:-0}" = 1 ] && [ -f "$TASK_CKPT/model.safetensors" ]; then
    echo "REUSE_CKPT=1: $TASK_CKPT from an earlier run on this machine"
  else
    echo "train ($MINUTES min, ${TASK_VARIANT%%:*})"
    # shellcheck disable=SC2086  # flags are words
    python3 -m benchmarks.tiny_vlm.train --out "$TASK_CKPT" --minutes "$MINUTES" --tokenizer-from "$MODEL" \
      ${TASK_VARIANT#*:} ${TRAIN_ARGS:-} >"$1" 2>&1
    grep -v -i -e warn -e "loading weights" "$1" | tail -2 || true
  fi
  cp "$TASK_CKPT/train_log.json" "$OUT/" 2>/dev/null || true
}
