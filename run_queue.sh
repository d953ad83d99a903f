#!/usr/bin/env bash
# the ablation queue: one arm at a time (2 cores)
export PYTHONPATH=/work/exp PY=/work/main/.venv/bin/python
cd /work/exp
S=trainer.max_steps=150
scripts/ablate.sh a0-light experiment=cpu $S
scripts/ablate.sh a1-wide experiment=cpu $S gistnet.width=256 gistnet.num_layers=2 gistnet.num_heads=8
scripts/ablate.sh a2-recon experiment=cpu $S module.recon_weight=1.0
scripts/ablate.sh a3-kl experiment=cpu $S module.kl_weight=1.0
scripts/ablate.sh a4-lr3e-3 experiment=cpu $S module.optimizer.lr=3e-3
scripts/ablate.sh a5-staged experiment=cpu $S module.recon_weight=1.0 module.recon_only_steps=50
