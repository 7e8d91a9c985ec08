# from the repository root: the demo's masking unit on the held-out split (20 % and 50 % of single patches masked
# instead of 20 % of the 2x2 clusters; Table 5 on Imagenette-96 has patch masking ahead), k = 2, blr 3e-3,
# fine-tuned with layer decay 1.0, seeds 0 and 1 (the cluster-masking runs of the same recipe: run.sh and
# run_cluster_size.sh)
export PYTHONPATH=src
D=runs/demo_recipes
H="data.holdout=0.1"
for cfg in "patch20 0.2 0" "patch20 0.2 1" "patch50 0.5 0" "patch50 0.5 1"; do
  set -- $cfg
  name=$1_s$3
  python -m mal pretrain --config demo_pretrain --output $D/pre_$name --overwrite --no-progress $H optim.blr=3e-3 \
    objective.mask.unit=patch objective.mask.ratio=$2 seed=$3
  python -m mal finetune --config demo_finetune --output $D/ft_$name --overwrite --no-progress $H init=$D/pre_$name/ckpt_last optim.layer_decay=1.0 seed=$3
done
