"""Bring-your-own data: a tokenizer trained here, ``moetrain data prepare`` into Megatron's indexed format
(read back by Megatron-Core's own reader when it imports), indexed sources with blends and held-out
splits, validation during training and ``moetrain eval``. Offline throughout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moetrain.launch.data import DataError, TokenBatches
from moetrain.launch.indexed import IndexedDataError, IndexedTokens, IndexedWriter
from moetrain.launch.prepare import PrepareError, prepare
from moetrain.launch.tokenizer import TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300


def _texts(n: int = 40) -> list[str]:
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8", errors="replace")[:4000] for f in files]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained here on Python sources, saved as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    texts = _texts()
    with open(d / "a.jsonl", "w") as f:
        for t in texts[:25]:
            f.write(json.dumps({"content": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"content": texts[25:35]}), d / "b.parquet")
    (d / "txt").mkdir()
    for i, t in enumerate(texts[35:]):
        (d / "txt" / f"{i}.txt").write_text(t)
    return {"jsonl": d / "a.jsonl", "parquet": d / "b.parquet", "txt": d / "txt", "texts": texts}


def test_prepare_writes_megatron_format_for_every_input_kind(tokenizer, corpus, tmp_path):
    tok = load_tokenizer(str(tokenizer))
    assert tok.eod_id == tok.token_id("</s>")
    done = prepare([str(corpus["jsonl"]), str(corpus["parquet"]), str(corpus["txt"])], str(tokenizer),
                   str(tmp_path / "all"), field="content", progress=False)
    texts = corpus["texts"]
    assert done["documents"] == len(texts) and done["dtype"] == "uint16"
    data = IndexedTokens(tmp_path / "all")
    assert data.num_documents == len(texts)
    for i in (0, 24, 25, 34, 35, len(texts) - 1):  # the first and last document of each input, in order
        expect = tok.encode(texts[i]) + [tok.eod_id]
        assert data.document(i).tolist() == expect, i
    assert tok.decode(data.document(3)[:-1].tolist()) == texts[3]
    assert done["tokens"] == len(data.tokens) and done["tokens_per_s"] > 0
    two = prepare([str(corpus["jsonl"]), str(corpus["parquet"]), str(corpus["txt"])], str(tokenizer),
                  str(tmp_path / "two"), field="content", workers=2, progress=False)
    assert two["documents"] == done["documents"]
    for suffix in (".bin", ".idx"):  # worker processes change nothing
        assert (tmp_path / f"two{suffix}").read_bytes() == (tmp_path / f"all{suffix}").read_bytes()


def test_megatron_core_reads_ours_and_we_read_megatrons(tokenizer, corpus, tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    prepare([str(corpus["jsonl"])], str(tokenizer), str(tmp_path / "ours"), field="content", progress=False)
    theirs = indexed.IndexedDataset(str(tmp_path / "ours"))
    ours = IndexedTokens(tmp_path / "ours")
    assert len(theirs) == ours.num_documents == 25
    assert theirs.document_indices.tolist() == ours.doc_index.tolist()
    for i in range(25):
        assert np.array_equal(theirs[i], ours.document(i))
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    docs = [np.arange(i, i + 7 + i, dtype=np.uint16) for i in range(5)]
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "meg.idx"))
    read = IndexedTokens(tmp_path / "meg")
    assert [read.document(i).tolist() for i in range(5)] == [d.tolist() for d in docs]


def test_sigterm_mid_prepare_leaves_no_partial_files_or_workers(tokenizer, tmp_path):
    """A scheduler's SIGTERM unwinds like Ctrl-C: the half-written .bin and the worker pool go, exit 143."""
    import signal
    import time

    texts = _texts()
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(5000):  # ~20 MB: many seconds of tokenizing, far more than the wait below
            f.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "moetrain", "data", "prepare", str(tmp_path / "big.jsonl"),
                             "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out"), "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in tmp_path.glob("out*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "prepare wrote nothing in 120 s"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip() == "terminated", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_prepare_and_tokenizer_mistakes_are_named(tokenizer, corpus, tmp_path):
    with pytest.raises(PrepareError, match="has no field 'text'.*content"):
        prepare([str(corpus["jsonl"])], str(tokenizer), str(tmp_path / "x"), progress=False)
    assert not list(tmp_path.glob("x*"))  # nothing half-written
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(PrepareError, match=r"unsupported input type \.csv"):
        prepare([str(tmp_path / "data.csv")], str(tokenizer), str(tmp_path / "x"), progress=False)
    with pytest.raises(PrepareError, match="no such file or directory"):
        prepare([str(tmp_path / "missing.jsonl")], str(tokenizer), str(tmp_path / "x"), progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(PrepareError, match="bad.jsonl: cannot be read as json"):
        prepare([str(tmp_path / "bad.jsonl")], str(tokenizer), str(tmp_path / "x"), progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PrepareError, match="no documents in .*empty.jsonl"):
        prepare([str(tmp_path / "empty.jsonl")], str(tokenizer), str(tmp_path / "x"), progress=False)
    assert not list(tmp_path.glob("x*"))
    prepare([str(corpus["parquet"])], str(tokenizer), str(tmp_path / "y"), field="content", progress=False)
    with pytest.raises(PrepareError, match="y.bin exists"):
        prepare([str(corpus["parquet"])], str(tokenizer), str(tmp_path / "y"), field="content", progress=False)
    with pytest.raises(TokenizerError, match=f"has {VOCAB} tokens but model.vocab_size=256"):
        load_tokenizer(str(tokenizer), vocab_size=256)
    with pytest.raises(TokenizerError, match="no token '<nope>'"):
        load_tokenizer(str(tokenizer), eod_token="<nope>")
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "none.json"))


def test_sentencepiece_model_tokenizes(corpus, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "train.txt").write_text("\n".join(line for t in corpus["texts"][:10] for line in t.splitlines()))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=200, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 200 and tok.eod_id == 2
    done = prepare([str(corpus["txt"])], str(tmp_path / "sp.model"), str(tmp_path / "sp_out"), progress=False)
    data = IndexedTokens(tmp_path / "sp_out")
    assert data.document(0).tolist() == tok.encode(corpus["texts"][35]) + [2]
    assert done["documents"] == 5


def _indexed(tmp_path: Path, name: str, n_docs: int, base: int) -> str:
    w = IndexedWriter(tmp_path / name, np.uint16)
    for i in range(n_docs):
        w.add(np.full(30, base + i, dtype=np.uint16))  # document i is a run of base + i
    w.finish()
    return str(tmp_path / name)


def _batches(source_kw: dict, **kw) -> TokenBatches:
    args = dict(seq_len=16, vocab_size=100, seed=3, global_batch=8, micro_batch=2, dp_rank=0, dp_size=1)
    args.update(kw)
    return TokenBatches("indexed", **source_kw, **args)


def test_indexed_source_blend_split_and_determinism(tmp_path):
    a, b = _indexed(tmp_path, "a", 40, 0), _indexed(tmp_path, "b", 40, 50)
    one = _batches({"path": a})
    assert one.windows == (40 * 30 - 1) // 16
    again = _batches({"path": a})
    for k in (0, 5, 77, 500):  # a pure function of (source, seed, k), across epochs
        assert np.array_equal(one._sample(k), again._sample(k))
    # a blend takes each dataset in proportion to its weight, deterministically
    mix = _batches({"blend": [[3, a], [1, b]]})
    from_b = sum(int(mix._sample(k)[0] >= 50) for k in range(400))
    assert from_b == 100
    assert np.array_equal(mix._sample(123), _batches({"blend": [[3, a], [1, b]]})._sample(123))
    # split: training and validation windows never overlap, together they are the whole dataset
    train = _batches({"path": a, "split": [80, 20]})
    valid = _batches({"path": a, "split": [80, 20]}, which="valid")
    assert train.parts[0][2:] == (0, int(one.windows * 0.8)) and valid.parts[0][2] == train.parts[0][3]
    assert train.parts[0][3] + valid.parts[0][3] == one.windows
    seen = {int(train._sample(k)[0]) for k in range(train.parts[0][3])}  # one epoch visits only training windows
    held = {int(valid._sample(k)[0]) for k in range(valid.parts[0][3])}
    assert max(seen) < min(held - seen)  # held-out windows come from the tail documents
    tiny = _indexed(tmp_path, "tiny", 1, 0)  # 30 tokens: one window
    with pytest.raises(DataError, match="leaves no training window at data.split"):
        _batches({"path": tiny, "split": [90, 10]})
    with pytest.raises(IndexedDataError, match="does not exist"):
        _batches({"path": str(tmp_path / "nothing")})
    (tmp_path / "a.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-2])
    with pytest.raises(IndexedDataError, match="the index describes"):
        _batches({"path": a})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrain", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_train_with_validation_then_eval_the_checkpoint(tokenizer, corpus, tmp_path):
    prep = _cli("data", "prepare", str(corpus["jsonl"]), str(corpus["txt"]), "--tokenizer", str(tokenizer),
                "--out", str(tmp_path / "corpus"), "--field", "content", "--workers", "2")
    assert prep.returncode == 0, prep.stderr
    assert "documents/s" in prep.stdout and "tokens/s" in prep.stdout
    common = ["model.layers=2", "model.d_model=32", "model.heads=4", f"model.vocab_size={VOCAB}", "model.seq_len=32",
              "moe.num_experts=4", "moe.topk=2", "cluster.ranks_per_node=2", "parallel.ep=2",
              "data.source=indexed", f"data.path={tmp_path / 'corpus'}", "data.split=[90,10]",
              f"data.tokenizer={tokenizer}", "train.eval_iters=2", "train.warmup_steps=0",
              f"checkpoint.dir={tmp_path / 'ck'}", f"logging.run_dir={tmp_path / 'run'}"]
    job = tmp_path / "job.yaml"
    job.write_text("{}\n")
    run = _cli("train", str(job), *common, "train.steps=4", "train.eval_every=2", "checkpoint.every=4",
               f"logging.tensorboard_dir={tmp_path / 'tb'}", "--summary", str(tmp_path / "s.json"))
    assert run.returncode == 0, run.stderr
    valid = json.loads((tmp_path / "s.json").read_text())["valid"]
    assert [v["step"] for v in valid] == [2, 4]
    assert all(v["ppl"] == pytest.approx(np.exp(v["loss"])) for v in valid)
    assert "valid at step     2" in run.stdout
    ev = _cli("eval", str(job), *common, "--json")
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert got["checkpoint_step"] == 4 and got["loss"] == pytest.approx(valid[-1]["loss"], rel=1e-6)
    none = _cli("eval", str(job), *common[:-2], f"checkpoint.dir={tmp_path / 'empty'}", f"logging.run_dir={tmp_path}")
    assert none.returncode == 2 and "moetrain eval needs weights" in none.stderr, none.stderr
    nosplit = _cli("eval", str(job), *[c for c in common if not c.startswith("data.split")])
    assert nosplit.returncode == 2 and "needs held-out data" in nosplit.stderr
    wrong_vocab = _cli("validate", str(job), *[c for c in common if "vocab_size" not in c], "model.vocab_size=256")
    assert wrong_vocab.returncode == 2 and "model.vocab_size=256" in wrong_vocab.stderr, wrong_vocab.stderr


def test_indexed_data_resumes_where_it_stopped(tmp_path):
    """Stopped after 2 steps and resumed, an indexed-data run takes the same samples as one that never stopped
    (sample k is a pure function of the data, the seed and k)."""
    a, b = _indexed(tmp_path, "a", 60, 0), _indexed(tmp_path, "b", 60, 50)
    (tmp_path / "job.yaml").write_text("{}\n")
    common = ["model.layers=1", "model.d_model=32", "model.heads=2", "model.vocab_size=128", "model.seq_len=16",
              "data.source=indexed", f"data.blend=[[2, {a}], [1, {b}]]", "train.steps=4", "train.warmup_steps=0",
              "train.dtype=float64", "checkpoint.every=2", "train.lr_schedule=constant"]

    def run(*extra: str) -> list[float]:
        done = _cli("train", str(tmp_path / "job.yaml"), *common, *extra, "--summary", str(tmp_path / "s.json"))
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / "s.json").read_text())["losses"]

    straight = run(f"checkpoint.dir={tmp_path / 'one'}", f"logging.run_dir={tmp_path / 'r1'}")
    run(f"checkpoint.dir={tmp_path / 'two'}", f"logging.run_dir={tmp_path / 'r2'}", "train.steps=2")
    resumed = run(f"checkpoint.dir={tmp_path / 'two'}", f"logging.run_dir={tmp_path / 'r3'}")
    assert len(straight) == 4 and resumed == straight
