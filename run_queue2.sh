#!/usr/bin/env bash
# the ablation queue, second order: one arm at a time (2 cores)
export PYTHONPATH=/work/exp PY=/work/main/.venv/bin/python
cd /work/exp
while [ ! -f outputs/ablation/a0-light/arm.json ]; do sleep 10; done
S=trainer.max_steps=150
EVAL_OVERRIDES="substitutability.windows.num_l2_windows=8" \
scripts/ablate.sh a6-l2share experiment=cpu $S data.window.l2_share=0.25
scripts/ablate.sh a3-kl experiment=cpu $S module.kl_weight=1.0
scripts/ablate.sh a4-lr3e-3 experiment=cpu $S module.optimizer.lr=3e-3
scripts/ablate.sh a1-wide experiment=cpu $S gistnet.width=256 gistnet.num_layers=2 gistnet.num_heads=8
scripts/ablate.sh a2-recon experiment=cpu $S module.recon_weight=1.0
