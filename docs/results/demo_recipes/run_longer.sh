# from the repository root: 24 and 48 pretraining epochs (4x and 8x the demo's) at blr 3e-3, fine-tuned with layer
# decay 1.0, seeds 0 and 1, on the held-out split; compare with ft_3e-3_ld1.0 / ft_k2_s1 (6 epochs) and training
# from scratch with seeds 0-3 (scratch, scratch_s1..s3)
export PYTHONPATH=src
D=runs/demo_recipes
H="data.holdout=0.1"
for ep in 24 48; do
  for seed in 0 1; do
    python -m mal pretrain --config demo_pretrain --output $D/pre${ep}_k2_s$seed --overwrite --no-progress $H optim.blr=3e-3 optim.epochs=$ep seed=$seed
    python -m mal finetune --config demo_finetune --output $D/ft${ep}_k2_s$seed --overwrite --no-progress $H init=$D/pre${ep}_k2_s$seed/ckpt_last optim.layer_decay=1.0 seed=$seed
  done
done
for seed in 2 3; do
  python -m mal supervised --config demo_finetune --output $D/scratch_s$seed --overwrite --no-progress $H init= optim.layer_decay=1.0 seed=$seed
done
