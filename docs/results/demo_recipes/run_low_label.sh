# from the repository root, after run_cluster_size.sh: fine-tune on 10 % of the labels (360 digits, 60 epochs) from
# the k = 1 and k = 2 pretrainings of seeds 0 and 1 (k = 2 seed 0 pretrained here), against training from scratch
export PYTHONPATH=src
D=runs/demo_recipes
H="data.holdout=0.1 data.label_fraction=0.1 optim.epochs=60 eval_every=20"
python -m mal pretrain --config demo_pretrain --output $D/pre_k2_s0 --overwrite --no-progress data.holdout=0.1 optim.blr=3e-3 model.cluster_size=2 seed=0
for name in k2_s0 k2_s1 k1_s0 k1_s1; do
  seed=${name#*_s}
  python -m mal finetune --config demo_finetune --output $D/low_$name --overwrite --no-progress $H init=$D/pre_$name/ckpt_last optim.layer_decay=1.0 seed=$seed
done
for seed in 0 1; do
  python -m mal supervised --config demo_finetune --output $D/low_scratch_s$seed --overwrite --no-progress $H init= optim.layer_decay=1.0 seed=$seed
done
