"""Long-context byte LM from scratch (S = 4096) for one GPU: dense, 2:4, hierarchical.

The byte LM of experiments/configs/bytelm.py on the stdlib sources at 4096
bytes of context, with task "bytelm_pattern" (experiments/long_context.py)
so that a run may add a block pattern to its attention. The sweep
experiments/sweeps/bytelm_long_context.py runs it three times:

  * dense attention (nmattn n == m);
  * 2:4 on every score;
  * hierarchical: per layer, `topk_blocks` of blocks of 128 on that layer's
    query and key, causal: the diagonal block and the one before it (the
    local band) and the first key block (a sink) DENSE, the highest pooled
    scores filling 6 key blocks per query block in all, 2:4 inside those.
    Of the 528 causal blocks of 32 x 32, every query block keeps
    min(6, reachable): 177, a block density of 0.335.

4 layers, hidden 256, 4 heads of 64, batch 8 x 4096 bytes, 300 steps,
float32 (the experiment models' precision) with their materialised causal
mask. Measured on one H200 (2026-12-03): the dense trial ran 1.5 s a step
(float32 attention with a mask goes to the Triton kernels' float32 path,
whose dots are full-precision FMA, not tensor cores), about 8 minutes a
trial, so the sweep needs about 25 minutes of device time.

  python -m experiments.launch --sweep=experiments/sweeps/bytelm_long_context.py
"""

import ml_collections

from experiments.configs import bytelm


def get_config() -> ml_collections.ConfigDict:
  config = bytelm.get_config()
  config.name = "bytelm_long"
  config.task = "bytelm_pattern"
  config.task_module = "experiments.long_context"
  config.attention.pattern = ml_collections.ConfigDict({
      "name": "", "block": 128, "k": 6, "local_blocks": 2, "sink_blocks": 1})
  config.data.update(seq_len=4096, eval_windows=64)
  config.model.update(hidden_size=256, num_heads=4, mlp_size=1024, num_layers=4)
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_steps = 300
  config.optimizer.update(learning_rate=2e-3, warmup_steps=30)
  config.log_every = 50
  config.eval_every = 0  # the final evaluation only
  config.checkpoint_every = 0  # the final checkpoint only
  config.max_checkpoints_to_keep = 1
  return config
