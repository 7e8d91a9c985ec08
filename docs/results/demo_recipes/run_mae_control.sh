# from the repository root: the positive control on the digits. On Imagenette-96 MAE pretraining of the same encoder
# beats MAL by 2.7 points (results.md); does it pay off at the demo's budget where MAL does not? MAE (75 % of the
# patches masked, the encoder reads the visible ones) with the demo's pretraining settings (6 epochs, blr 1e-3), each
# encoder fine-tuned with layer decay 1.0, held-out split, seeds 0-3, paired with training from scratch of the same
# seed (scratch, scratch_s1..s3).
# Hypothesis (written before running): if MAE's four-seed paired interval against scratch lies above 0, the demo's
# loss is MAL's objective at this budget; if it does not, no pretraining pays off at the demo's budget and the demo
# cannot show a gain with any objective we have.
export PYTHONPATH=src
D=runs/demo_recipes
H="data.holdout=0.1"
for seed in 0 1 2 3; do
  python -m mal pretrain --config demo_pretrain --output $D/pre_mae_s$seed --overwrite --no-progress $H \
    objective.kind=mae objective.mask.unit=patch objective.mask.ratio=0.75 seed=$seed
  python -m mal finetune --config demo_finetune --output $D/ft_mae_s$seed --overwrite --no-progress $H \
    init=$D/pre_mae_s$seed/ckpt_last optim.layer_decay=1.0 seed=$seed
done
