"""The experiment tasks behind `experiments.train`, and the registry of tasks.

A task owns its data, model and loss:
  * `init_params(rng)` -> Flax params;
  * `train_batch(step)` -> the global batch of a step as numpy arrays with a
    leading `[batch_size]` axis; a pure function of (`config.seed`, step), so a
    resumed run sees the same data in the same order;
  * `loss(params, batch, dropout_rng)` -> (scalar loss, dict of scalars),
    jittable;
  * `eval_inputs(split)` -> numpy arrays with a leading `[num_examples]` axis;
  * `predict(params, batch)` -> per-example outputs (jittable);
  * `metrics(outputs)` -> dict of floats over a whole split.

"listops": `SequenceClassifier` on generated ListOps, accuracy.
"bytelm": causal `Decoder` on bytes, bits per byte: the stdlib sources, or
any text files or directories (`config.data.text_paths`).
"retrieval": the pretrained MiniLM `SentenceEncoder` on query -> document
retrieval, contrastive loss with in-batch negatives, recall@1/5/10, MRR and
the cosine of each embedding to the dense model's: stdlib docstring -> code
pairs, or (query, document) pairs from a JSONL file
(`config.data.pairs_jsonl`).

Tasks are built by name from `TASKS`, a registry: a module outside
`experiments` adds its own with

  @experiments.tasks.register("my_task")
  def build_my_task(config):  # -> an object with the methods above
    ...

and a run selects it with `config.task = "my_task"`, importing the module
either from its config file (a plain `import my_module` at its top) or by
naming it in `config.task_module`, which `build` imports.
"""

from __future__ import annotations

import collections.abc
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import files, listops, minilm, stdlib
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import (Decoder, SentenceEncoder,
                                            SequenceClassifier,
                                            TransformerConfig)



class TaskRegistry(collections.abc.Mapping):
  """Task builders by name: `registry[name](config)` -> a task.

  A read-only mapping (so `name in TASKS` and `tuple(TASKS)` work) with
  `register` to add a builder.
  """

  def __init__(self):
    self._builders = {}

  def register(self, name: str, builder=None, *, replace: bool = False):
    """Adds `builder` (a callable `config -> task`) under `name`.

    Used directly, `register("name", builder)`, or as a decorator,
    `@register("name")` on a function or class. Registering a taken name is an
    error unless `replace=True`. Returns `builder`.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"task name must be a non-empty string; got name={name!r}")
    if builder is None:
      return lambda builder: self.register(name, builder, replace=replace)
    if not callable(builder):
      raise ValueError(f"task builder must be callable (config -> task); got "
                       f"builder={builder!r} for name={name!r}")
    if name in self._builders and not replace:
      raise ValueError(f"task name is already registered (pass replace=True "
                       f"to override it); got name={name!r}")
    self._builders[name] = builder
    return builder

  def __getitem__(self, name):
    return self._builders[name]

  def __iter__(self):
    return iter(self._builders)

  def __len__(self):
    return len(self._builders)

  def __repr__(self):
    return repr(tuple(self._builders))


TASKS = TaskRegistry()
register = TASKS.register


def epoch_indices(num_examples: int, batch_size: int, step: int,
                  seed: int) -> np.ndarray:
  """Example indices of a step: `[batch_size]`, walking a fresh permutation
  of `range(num_examples)` each epoch (seeded by (seed, epoch))."""
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1; got num_examples={num_examples}")
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    permutation = np.random.default_rng([seed, int(epoch)]).permutation(
        num_examples)
    chosen = epochs == epoch
    indices[chosen] = permutation[offsets[chosen]]
  return indices


def _model_config(config, vocab_size: int, max_len: int) -> TransformerConfig:
  model = config.model
  return TransformerConfig(
      vocab_size=vocab_size, max_len=max_len, hidden_size=model.hidden_size,
      num_heads=model.num_heads, mlp_size=model.mlp_size,
      num_layers=model.num_layers, dropout_rate=model.dropout_rate,
      attention_dropout_rate=model.attention_dropout_rate)


def attention_spec(config) -> AttentionSpec:
  return AttentionSpec(kind=config.attention.kind, n=config.attention.n,
                       m=config.attention.m)


@register("listops")
class ListOpsTask:
  """10-way classification of ListOps expressions."""

  def __init__(self, config):
    data = config.data
    self.splits = listops.generate(listops.ListOpsSpec(
        num_train=data.num_train, num_valid=data.num_valid,
        num_test=data.num_test, min_length=data.min_length,
        max_length=data.max_length, max_depth=data.max_depth,
        max_args=data.max_args, seed=data.seed))
    self.batch_size = config.batch_size
    self.seed = config.seed
    self.model = SequenceClassifier(
        _model_config(config, len(listops.VOCAB), data.max_length + 1),
        attention_spec(config), num_classes=listops.NUM_CLASSES)

  def init_params(self, rng):
    train = self.splits["train"]
    return self.model.init(rng, train.tokens[:1], train.mask[:1])["params"]

  def train_batch(self, step):
    train = self.splits["train"]
    idx = epoch_indices(len(train.labels), self.batch_size, step, self.seed)
    return {"tokens": train.tokens[idx], "mask": train.mask[idx],
            "labels": train.labels[idx]}

  def loss(self, params, batch, dropout_rng):
    logits = self.model.apply({"params": params}, batch["tokens"],
                              batch["mask"], deterministic=False,
                              rngs={"dropout": dropout_rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["labels"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
    return loss, {"accuracy": accuracy}

  def eval_inputs(self, split):
    data = self.splits[split]
    return {"tokens": data.tokens, "mask": data.mask, "labels": data.labels}

  def predict(self, params, batch):
    logits = self.model.apply({"params": params}, batch["tokens"],
                              batch["mask"])
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(
                logits, batch["labels"]),
            "correct": jnp.argmax(logits, -1) == batch["labels"]}

  def metrics(self, outputs):
    return {"loss": float(np.mean(outputs["loss"])),
            "accuracy": float(np.mean(outputs["correct"]))}


@register("bytelm")
class ByteLMTask:
  """Next-byte prediction on the CPython standard library sources or on text files.

  `config.data.text_paths` (files and directories; empty: the stdlib) with
  `text_suffixes`, `valid_percent` and `test_percent` as in
  `experiments.data.files.byte_corpus`.
  """

  def __init__(self, config):
    data = config.data
    self.seq_len = data.seq_len
    text_paths = tuple(data.get("text_paths", ()))
    if text_paths:
      self.corpus = files.byte_corpus(
          text_paths, valid_percent=data.valid_percent,
          test_percent=data.test_percent,
          suffixes=tuple(data.get("text_suffixes", ())))
      for split, stream in self.corpus.streams.items():
        if split == "train" or len(stream):
          if len(stream) < self.seq_len + 1:
            raise ValueError(
                f"config.data.text_paths must hold at least seq_len + 1 = "
                f"{self.seq_len + 1} bytes in split {split!r}; got "
                f"{len(stream)} bytes there from text_paths={text_paths}")
    else:
      self.corpus = stdlib.ByteCorpus.load()
    self.eval_windows = data.eval_windows
    self.batch_size = config.batch_size
    self.seed = config.seed
    self.model = Decoder(_model_config(config, 256, data.seq_len),
                         attention_spec(config))

  def init_params(self, rng):
    return self.model.init(rng, np.zeros((1, self.seq_len), np.int32))["params"]

  def train_batch(self, step):
    rng = np.random.default_rng([self.seed, step])
    windows = self.corpus.random_windows("train", self.seq_len + 1,
                                         self.batch_size, rng)
    return {"bytes": windows}

  def _token_losses(self, params, windows, deterministic, dropout_rng=None):
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    logits = self.model.apply({"params": params}, windows[:, :-1],
                              deterministic=deterministic, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, windows[:, 1:])

  def loss(self, params, batch, dropout_rng):
    loss = self._token_losses(params, batch["bytes"], False, dropout_rng).mean()
    return loss, {"bits_per_byte": loss / math.log(2)}

  def eval_inputs(self, split):
    return {"bytes": self.corpus.strided_windows(split, self.seq_len + 1,
                                                 self.eval_windows)}

  def predict(self, params, batch):
    return {"loss": self._token_losses(params, batch["bytes"], True).mean(-1)}

  def metrics(self, outputs):
    loss = float(np.mean(outputs["loss"]))
    return {"loss": loss, "bits_per_byte": loss / math.log(2)}


def retrieval_ranks(similarity) -> np.ndarray:
  """Each query's rank in `similarity [queries, documents]`, query i's answer
  being document i: the number of documents scored strictly above its answer
  (a tie counts for the answer), so 0 is a hit at 1."""
  similarity = np.asarray(similarity)
  if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
    raise ValueError("similarity must be square [queries, documents]; got "
                     f"similarity.shape={similarity.shape}")
  return np.sum(similarity > np.diag(similarity)[:, None], axis=-1)


def retrieval_metrics(similarity, ks=(1, 5, 10)) -> dict[str, float]:
  """recall@k and MRR of `similarity [queries, documents]` from
  `retrieval_ranks`: recall@k is the fraction of queries ranked below k, MRR
  the mean of 1 / (rank + 1).
  """
  rank = retrieval_ranks(similarity)
  metrics = {f"recall_at_{k}": float(np.mean(rank < k)) for k in ks}
  metrics["mrr"] = float(np.mean(1.0 / (rank + 1)))
  return metrics


def _retrieval_pairs(data) -> dict[str, list[files.Pair]]:
  """`config.data`'s pairs: the JSONL file `pairs_jsonl`, else stdlib docstrings."""
  if data.get("pairs_jsonl", ""):
    return files.read_pairs(data.pairs_jsonl, query_field=data.query_field,
                            document_field=data.document_field,
                            valid_percent=data.valid_percent,
                            test_percent=data.test_percent)
  docstrings = stdlib.docstring_pairs(valid_percent=data.valid_percent,
                                      test_percent=data.test_percent,
                                      packages=tuple(data.packages))
  return {split: [files.Pair(p.docstring, p.code) for p in pairs]
          for split, pairs in docstrings.items()}


@register("retrieval")
class RetrievalTask:
  """Query -> document retrieval with the pretrained MiniLM sentence encoder.

  The pairs are stdlib docstring -> code, or `config.data.pairs_jsonl`'s
  (`experiments.data.files.read_pairs`). Training starts from the pretrained
  (dense) weights whatever the attention kind; `num_steps = 0` measures
  zero-shot fidelity.
  """

  def __init__(self, config):
    data = config.data
    self.pairs = _retrieval_pairs(data)
    self.source = data.get("pairs_jsonl", "") or "the stdlib docstrings"
    if not self.pairs["train"] and config.num_steps:
      raise ValueError(f"config.data.pairs_jsonl has no train pair to train "
                       f"{config.num_steps} steps on; got "
                       f"pairs_jsonl={self.source!r}")
    query_tokenizer = minilm.Tokenizer(data.query_len)
    code_tokenizer = minilm.Tokenizer(data.code_len)
    self.inputs = {}
    for split, pairs in self.pairs.items():
      # A fixed shuffle, so a capped split samples every module.
      order = np.random.default_rng(0).permutation(len(pairs))
      cap = data.max_train_pairs if split == "train" else data.max_eval_pairs
      pairs = [pairs[i] for i in order[:cap or len(pairs)]]
      self.pairs[split] = pairs
      if not pairs:
        continue
      query_tokens, query_mask = query_tokenizer([p.query for p in pairs])
      code_tokens, code_mask = code_tokenizer([p.document for p in pairs])
      self.inputs[split] = {"query_tokens": query_tokens,
                            "query_mask": query_mask,
                            "code_tokens": code_tokens, "code_mask": code_mask}
    self.batch_size = config.batch_size
    self.seed = config.seed
    self.logit_scale = data.logit_scale
    max_len = max(data.query_len, data.code_len)
    model_config = minilm.transformer_config(
        max_len, dropout_rate=config.model.dropout_rate)
    self.model = SentenceEncoder(model_config, attention_spec(config))
    self.dense_model = SentenceEncoder(model_config, AttentionSpec("dense"))
    self.model_config = model_config

  def init_params(self, rng):
    del rng  # the pretrained weights
    return {"encoder": minilm.encoder_params(self.model_config)}

  def train_batch(self, step):
    train = self.inputs["train"]
    idx = epoch_indices(len(train["query_tokens"]), self.batch_size, step,
                        self.seed)
    return {name: array[idx] for name, array in train.items()}

  def loss(self, params, batch, dropout_rng):
    query_rng, code_rng = jax.random.split(dropout_rng)
    embed = lambda tokens, mask, rng: self.model.apply(
        {"params": params}, tokens, mask, deterministic=False,
        rngs={"dropout": rng})
    queries = embed(batch["query_tokens"], batch["query_mask"], query_rng)
    codes = embed(batch["code_tokens"], batch["code_mask"], code_rng)
    logits = self.logit_scale * queries @ codes.T
    labels = jnp.arange(logits.shape[0])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"in_batch_recall_at_1": jnp.mean(
        jnp.argmax(logits, -1) == labels)}

  def eval_inputs(self, split):
    if split not in self.inputs:
      raise ValueError(f"split has no retrieval pairs in {self.source!r}; got "
                       f"split={split!r}")
    return self.inputs[split]

  def predict(self, params, batch):
    outputs = {}
    for side in ("query", "code"):
      tokens, mask = batch[f"{side}_tokens"], batch[f"{side}_mask"]
      outputs[side] = self.model.apply({"params": params}, tokens, mask)
      outputs[f"{side}_dense"] = self.dense_model.apply({"params": params},
                                                        tokens, mask)
    return outputs

  def ranks(self, outputs):
    """Per query, the `retrieval_ranks` behind `metrics`' recall and MRR (for
    paired comparisons of runs on the same split)."""
    return retrieval_ranks(outputs["query"] @ outputs["code"].T)

  def metrics(self, outputs):
    query_cosine = np.sum(outputs["query"] * outputs["query_dense"], -1)
    code_cosine = np.sum(outputs["code"] * outputs["code_dense"], -1)
    cosine = np.concatenate([query_cosine, code_cosine])
    return {**retrieval_metrics(outputs["query"] @ outputs["code"].T),
            "cosine_to_dense": float(np.mean(cosine)),
            "min_cosine_to_dense": float(np.min(cosine)),
            "query_cosine_to_dense": float(np.mean(query_cosine)),
            "code_cosine_to_dense": float(np.mean(code_cosine))}


def import_task_module(config) -> None:
  """Imports `config.task_module` (if set), whose import registers its tasks."""
  module = config.get("task_module", "")
  if module:
    importlib.import_module(module)
    if config.task not in TASKS:
      raise ValueError(f"config.task_module={module!r} registers no task "
                       f"config.task={config.task!r}; registered: {TASKS}")


def build(config):
  """The task named by `config.task`, after importing `config.task_module`."""
  import_task_module(config)
  if config.task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}; got task={config.task!r}")
  return TASKS[config.task](config)
