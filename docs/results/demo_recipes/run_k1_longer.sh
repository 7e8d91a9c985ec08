# from the repository root: single-patch clusters (k = 1) with 24 pretraining epochs, seeds 0-3, on the held-out split.
# Hypothesis, written before running: the two changes that helped separately (k = 1: 84.9 against 82.4 % for k = 2 at
# 6 epochs; 24 epochs: 85.8 against 82.4 % at k = 2) add up, and the fine-tune beats training from scratch with the
# same seeds (scratch, scratch_s1..s3: 84.7 +- 2.2 %) with a paired 95 % interval above 0. The demo adopts the recipe
# only then.
export PYTHONPATH=src
D=runs/demo_recipes
H="data.holdout=0.1"
for seed in 0 1 2 3; do
  python -m mal pretrain --config demo_pretrain --output $D/pre24_k1_s$seed --overwrite --no-progress $H optim.blr=3e-3 \
    optim.epochs=24 model.cluster_size=1 seed=$seed
  python -m mal finetune --config demo_finetune --output $D/ft24_k1_s$seed --overwrite --no-progress $H \
    init=$D/pre24_k1_s$seed/ckpt_last optim.layer_decay=1.0 seed=$seed
done
