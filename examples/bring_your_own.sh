#!/usr/bin/env bash
# Bring your own model and data, end to end on CPU (about a minute on 2 cores):
# corpus + tokenizer -> data prepare -> train a tiny Qwen3-MoE at tp2 x ep2 with validation -> eval ->
# export to a Hugging Face directory -> transformers loads and continues a prompt -> moetrain generate.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CFG=cluster_configs/qwen3_moe_tiny_cpu.yaml
OUT=${OUT:-runs/byo}   # the config's paths, moved with OUT
PATHS=("data.path=$OUT/corpus" "data.tokenizer=$OUT/tokenizer" "checkpoint.dir=$OUT/ckpt" "logging.run_dir=$OUT/run")
rm -rf "$OUT"
"$BIN/python" examples/make_corpus.py "$OUT"
"$BIN/moetrain" data prepare "$OUT/corpus.jsonl" --tokenizer "$OUT/tokenizer" --out "$OUT/corpus"
"$BIN/moetrain" train "$CFG" "${PATHS[@]}" --summary "$OUT/summary.json"
"$BIN/moetrain" eval "$CFG" "${PATHS[@]}" "logging.run_dir=$OUT/eval"
"$BIN/moetrain" checkpoint export-hf "$OUT/ckpt" --out "$OUT/hf"
"$BIN/python" - "$OUT/hf" <<'PY'
import sys
try:
    from transformers import AutoModelForCausalLM, AutoTokenizer
except ImportError:
    sys.exit("transformers is not installed: skipping the HF check (pip install transformers)")
path = sys.argv[1]
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
ids = tok("def ", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20, do_sample=False)
print("transformers:", tok.decode(out[0]))
PY
echo -n "moetrain:     "
"$BIN/moetrain" generate "$CFG" "${PATHS[@]}" --prompt "def " --max-new-tokens 20
