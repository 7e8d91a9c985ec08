# from the repository root, after run_short_ft.sh: why the demo's pretrained encoder fine-tunes 12 points BELOW
# training from scratch after 2 labelled epochs (47.4 against 59.4 %, four seeds). Hypotheses, written before running:
# (a) the fine-tune reverses every other layer (bidirectional: true) while the encoder was pretrained causal; with
#     model.bidirectional=false in both arms the pretrained start no longer loses by more than twice the seed spread;
# (b) layer decay 0.85 (fine-tune) against 1.0 (scratch) slows the pretrained run's lower layers; with 1.0 in both
#     arms the gap closes the same way.
export PYTHONPATH=src
D=runs/demo_short
H="data.holdout=0.1 optim.epochs=2 eval_every=2"
for seed in 0 1 2 3; do
  python -m mal finetune --config demo_finetune --output $D/diag_ft2_causal_s$seed --overwrite --no-progress $H \
    init=$D/short_pre_s$seed/ckpt_last model.bidirectional=false seed=$seed
  python -m mal supervised --config demo_finetune --output $D/diag_scratch2_causal_s$seed --overwrite --no-progress $H \
    init= optim.layer_decay=1.0 model.bidirectional=false seed=$seed
  python -m mal finetune --config demo_finetune --output $D/diag_ft2_ld1.0_s$seed --overwrite --no-progress $H \
    init=$D/short_pre_s$seed/ckpt_last optim.layer_decay=1.0 seed=$seed
done
