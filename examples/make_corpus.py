"""A corpus and a tokenizer made on this machine, offline: Python's own standard-library sources as a jsonl
file (one document per module, field ``text``) and a byte-level BPE tokenizer of 500 ids trained on them
with the ``tokenizers`` library (an HF tokenizer directory; ``</s>`` ends documents).

    python examples/make_corpus.py OUT_DIR     # writes OUT_DIR/corpus.jsonl and OUT_DIR/tokenizer/
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/byo")
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    (out / "tokenizer").mkdir(exist_ok=True)
    tok.save(str(out / "tokenizer" / "tokenizer.json"))
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}, indent=2) + "\n")
    print(f"wrote {len(texts)} documents to {out / 'corpus.jsonl'} and a {tok.get_vocab_size()}-token tokenizer "
          f"to {out / 'tokenizer'}")


if __name__ == "__main__":
    main()
