"""Long-context byte LM from scratch (S = 4096) for one GPU: dense, 2:4, hierarchical.

The byte LM of experiments/configs/bytelm.py on the stdlib sources at 4096
bytes of context, with task "bytelm_pattern" (experiments/long_context.py)
so that a run may add a block pattern to its attention. The sweep
experiments/sweeps/bytelm_long_context.py runs it three times:

  * dense attention (nmattn n == m);
  * 2:4 on every score;
  * hierarchical: per layer, `topk_blocks` of blocks of 128 on that layer's
    query and key, causal and autoregressive (chosen from earlier positions
    only): the diagonal block and the one before it (the local band) and
    the first key block (a sink) DENSE, the highest pooled scores filling 6
    key blocks per query block in all, 2:4 inside those. Of the 528 causal
    blocks of 32 x 32, every query block keeps min(6, reachable): 177, a
    block density of 0.335.

4 layers, hidden 256, 4 heads of 64, batch 8 x 4096 bytes, 4500 steps
(at 1500 dense has not yet made its late drop: 2.88 test bits per byte
against 0.88 at 4500, H100, 2026-12-07).
Activations and attention inputs in bfloat16 (`config.model.dtype`;
parameters, logits and loss float32), causal masking by `is_causal` (no
[S, S] mask, tiles above the diagonal skipped). With `implementation=None`
on an H200 the dense trial's attention goes to cuDNN (nmattn's "cudnn"
backend), the 2:4 and the pattern trials to `pallas_mosaic` (its forward,
the Triton backward).

Measured on one H200 (2026-12-04, experiments/long_context_gpu.sh): 6.5 /
8.3 ms a step (dense / 2:4) after compilation, the three trials of 1500
steps in 169 s of wall time. Before bf16 and `is_causal` (float32 with a
materialised causal mask: the Triton kernels' float32 path) the dense
trial took 1.5 s a step. The bits per byte are in docs/results/long_context.md.

  python -m experiments.launch --sweep=experiments/sweeps/bytelm_long_context.py
  experiments/long_context_gpu.sh [--steps=4500]       # on a GPU machine
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
  # The compute dtype (read by the bytelm_pattern task; train.validate
  # refuses it for tasks that run float32 only).
  config.model.dtype = "bfloat16"
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_steps = 4500
  config.optimizer.update(learning_rate=2e-3, warmup_steps=30)
  config.log_every = 100
  config.eval_every = 0  # the final evaluation only
  config.checkpoint_every = 0  # the final checkpoint only
  config.max_checkpoints_to_keep = 1
  return config
