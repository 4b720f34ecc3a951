# Sourced by compression_bench.sh and train_tiny.sh: the row task that issue 13's compression accuracy
# is measured on, as one train_tiny.sh variant "name:train.py flags" (ROW_VARIANT) and its checkpoint
# (ROW_CKPT), for ROW_IMAGES images per request (the sourcing script sets its default):
#   1      layout b, one image, "What are the colours of row r, left to right?"       /tmp/tiny-rows
#   K 2..6 layout mrow, K labelled images ("Image 1:" ...), "... of row r of image i ..." after all of
#          them (prompts of ~370 tokens at K = 4, ~510 at 6: alpha 0.1 keeps more than the last 25)
#                                                                                       /tmp/tiny-mrowsK
# One place for the flags, so a checkpoint train_tiny.sh left is the one compression_bench.sh would train.
case "$ROW_IMAGES" in
  1) ROW_VARIANT="rows:--layers 8 --layouts b:1 --kinds-b row:0.6,cell:0.2,count:0.2 --route-p-ref 0" ;;
  [2-6]) ROW_VARIANT="mrows$ROW_IMAGES:--layers 8 --layouts mrow:1 --row-images $ROW_IMAGES" ;;
  *) echo "ROW_IMAGES must be 1..6, got '$ROW_IMAGES'" >&2; return 1 2>/dev/null || exit 1 ;;
esac
ROW_CKPT=/tmp/tiny-${ROW_VARIANT%%:*}
