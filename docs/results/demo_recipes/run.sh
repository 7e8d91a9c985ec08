# from the repository root; summaries of each run are beside this script
mkdir -p runs/demo_recipes
H="data.holdout=0.1"
for b in 1e-3 3e-3; do
  python -m mal pretrain --config demo_pretrain --output runs/demo_recipes/pre_$b --overwrite --no-progress $H optim.blr=$b > runs/demo_recipes/pre_$b.log 2>&1
  for ld in 0.85 1.0; do
    python -m mal finetune --config demo_finetune --output runs/demo_recipes/ft_${b}_ld$ld --overwrite --no-progress $H init=runs/demo_recipes/pre_$b/ckpt_last optim.layer_decay=$ld > runs/demo_recipes/ft_${b}_ld$ld.log 2>&1
  done
done
python -m mal supervised --config demo_finetune --output runs/demo_recipes/scratch --overwrite --no-progress $H init= optim.layer_decay=1.0 > runs/demo_recipes/scratch.log 2>&1
echo done > runs/demo_recipes/DONE
