#!/usr/bin/env python3
"""llama.cpp's convert_hf_to_gguf.py for benches/vlm/llamacpp.sh's random checkpoint.

usage: llamacpp_convert.py LLAMA_CPP_DIR CONVERTER_ARGS...

Runs LLAMA_CPP_DIR/convert_hf_to_gguf.py with CONVERTER_ARGS, changed in one place: the
checkpoint carries quire's small test tokenizer (tests/fixtures/idefics3/split_sf2_gqa: byte-level
BPE, 420 tokens + 43 added, GPT-2's split regex), which is not one of the tokenizers the converter
knows by the hash of its output, so it stops at "BPE pre-tokenizer was not recognized". Here an
unknown hash maps to "gpt-2", the pre-tokenizer this tokenizer has (a `ByteLevel` pre-tokenizer
with `use_regex`, nothing else). The weights, the model and the projector are converted as they
would be anyway; the prompt only needs to tokenize to the same ids as in quire.

And one token is added: llama.cpp's Idefics3 prompt puts the token "\\n\\n" (byte-level "ĊĊ", a
token in SmolVLM's real vocabulary) before the overview image, and llama-mtmd-cli aborts with
"GGML_ASSERT(idx >= 0) failed" in mtmd_helper_eval_chunk_single when the vocabulary has none (the
lookup gives -1). The test tokenizer has 420 tokens while the model has 49,280 rows; the first
unused row (id 420, a "[PAD420]" placeholder in the GGUF) becomes "ĊĊ", with no merge, so no
text tokenizes differently.
"""
import logging
import runpy
import sys

llama = sys.argv[1]
sys.argv = [f"{llama}/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path.insert(0, llama)
from conversion import base  # noqa: E402  (the module the converter will import too)

known = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        logging.getLogger("llamacpp_convert").warning("unknown BPE pre-tokenizer hash: using gpt-2 (byte-level BPE)")
        return "gpt-2"


base.TextModel.get_vocab_base_pre = get_vocab_base_pre

vocab_base = base.TextModel.get_vocab_base


def get_vocab_base(self):
    tokens, toktypes, tokpre = vocab_base(self)
    if "\u010a\u010a" not in tokens:
        i = next(i for i, t in enumerate(toktypes) if t == base.gguf.TokenType.UNUSED)
        logging.getLogger("llamacpp_convert").warning(f"no token for \\n\\n: {tokens[i]} becomes it")
        tokens[i], toktypes[i] = "\u010a\u010a", base.gguf.TokenType.NORMAL
    return tokens, toktypes, tokpre


base.TextModel.get_vocab_base = get_vocab_base
runpy.run_path(sys.argv[0], run_name="__main__")
