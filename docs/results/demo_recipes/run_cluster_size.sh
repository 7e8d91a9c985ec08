# from the repository root: the demo's cluster size on the held-out split (k = 1 single patches and k = 3, four
# clusters of 3x3, against the demo's k = 2; blr 3e-3, fine-tuned with layer decay 1.0), seeds 0 and 1, and training from scratch with seed 1
# (seed 0 of k = 2 and of scratch are pre_3e-3 / ft_3e-3_ld1.0 / scratch, run by run.sh)
export PYTHONPATH=src
D=runs/demo_recipes
H="data.holdout=0.1"
for cfg in "k1 1 0" "k1 1 1" "k2 2 1" "k3 3 0" "k3 3 1"; do
  set -- $cfg
  name=$1_s$3
  python -m mal pretrain --config demo_pretrain --output $D/pre_$name --overwrite --no-progress $H optim.blr=3e-3 model.cluster_size=$2 seed=$3
  python -m mal finetune --config demo_finetune --output $D/ft_$name --overwrite --no-progress $H init=$D/pre_$name/ckpt_last optim.layer_decay=1.0 seed=$3
done
python -m mal supervised --config demo_finetune --output $D/scratch_s1 --overwrite --no-progress $H init= optim.layer_decay=1.0 seed=1
