# from the repository root: 24 pretraining epochs (4x the demo's) at blr 3e-3, fine-tuned with layer decay 1.0,
# seeds 0 and 1, on the held-out split; compare with ft_3e-3_ld1.0 / ft_k2_s1 (6 epochs) and scratch / scratch_s1
export PYTHONPATH=src
D=runs/demo_recipes
H="data.holdout=0.1"
for seed in 0 1; do
  python -m mal pretrain --config demo_pretrain --output $D/pre24_k2_s$seed --overwrite --no-progress $H optim.blr=3e-3 optim.epochs=24 seed=$seed
  python -m mal finetune --config demo_finetune --output $D/ft24_k2_s$seed --overwrite --no-progress $H init=$D/pre24_k2_s$seed/ckpt_last optim.layer_decay=1.0 seed=$seed
done
