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

4 layers, hidden 256, 4 heads of 64, batch 8 x 4096 bytes, 300 steps.
Activations and attention inputs in bfloat16 (`config.model.dtype`;
parameters, logits and loss float32), causal masking by `is_causal` (no
[S, S] mask, tiles above the diagonal skipped). With `implementation=None`
on a GPU the dense trial's attention goes to cuDNN through nmattn's "cudnn"
backend (n == m, 16-bit, no mask or bias), the 2:4 trial to the first of
`nmattn.backends.AUTO_ORDER` that runs it, the pattern trial to Triton.

What is known about the cost:
  * Before these two changes (float32, a materialised causal mask) the dense
    trial ran 1.5 s a step on one H200 (2026-12-03): float32 attention goes
    to the Triton kernels' float32 path (full-precision FMA dots, no tensor
    cores), and a mask skips no tile and adds an [S, S] term; about 8
    minutes a trial, 25 for the sweep (that run stopped at step 190 of the
    first trial).
  * A step is about 1.6 dense-equivalent TFLOP: causal attention 0.27
    forward (4 layers x 2 products x 8 x 4 heads x 4096^2 / 2 x 64 x 2),
    about 1.0 with the backward; projections and MLP 6 x 3.1M parameters x
    32768 tokens = 0.62.
  * On the CPU (xla backend) the decoder's float32 output with `is_causal`
    equals the materialised-mask output bit for bit (dense, 2:4, 1:2, topk,
    local, pattern); tests/test_experiments_models.py checks it.
  * Not yet measured on the GPU with bf16: the seconds per step, and so
    whether 300 steps x 3 trials fit the ~5 device-minutes they were sized
    for. experiments/long_context_gpu.sh runs the sweep under a time limit
    and prints seconds per step (median of the logged windows after the
    first, which holds the compilation); its --steps flag sets num_steps.

  python -m experiments.launch --sweep=experiments/sweeps/bytelm_long_context.py
  experiments/long_context_gpu.sh [--steps=300]        # on a GPU machine
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
  config.num_steps = 300
  config.optimizer.update(learning_rate=2e-3, warmup_steps=30)
  config.log_every = 50
  config.eval_every = 0  # the final evaluation only
  config.checkpoint_every = 0  # the final checkpoint only
  config.max_checkpoints_to_keep = 1
  return config
