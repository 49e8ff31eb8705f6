#!/usr/bin/env python3
"""Writes a random-weight Idefics2 checkpoint with Idefics2-8B's widths and cut depths (not committed).

usage: make_ckpt_idefics2.py OUT_DIR [--text-layers N] [--vision-layers N]

Widths as Idefics2-8B: SigLIP vision 1152 wide (4304 MLP, 16 heads, patch 14, 980 px
positions), perceiver resampler with its real shape (3 layers, 64 latents, 16 heads x 96
over 4 KV heads, 4096 wide), Mistral text 4096 wide (14336 MLP, 32 heads over 8 KV heads,
vocab 32003, sliding window 4096). Depths are cut (default 2 text layers, 4 vision layers)
so quire and transformers each hold the model in f32 well inside 24 GiB one after the
other. The image processor keeps Idefics2-8B's size rule (shortest edge 378, longest 980,
no splitting): bench.sh's 360x480 page becomes 378x480 (27x34 patches). The tokenizer is
the Idefics2 test fixture's (its ids are a subset of the vocabulary).
"""
import argparse
import os
import shutil

import torch
from transformers import AutoTokenizer, Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--text-layers", type=int, default=2)
ap.add_argument("--vision-layers", type=int, default=4)
args = ap.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
fixture = os.path.join(here, "..", "..", "tests", "fixtures", "idefics2", "split_gqa")
shutil.rmtree(args.out, ignore_errors=True)
tok = AutoTokenizer.from_pretrained(fixture)
cfg = Idefics2Config(
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.vision_layers,
                       num_attention_heads=16, image_size=980, patch_size=14),
    perceiver_config=dict(hidden_size=4096, resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                          resampler_head_dim=96, num_key_value_heads=4, rms_norm_eps=1e-5),
    text_config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=args.text_layers, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=32003, rms_norm_eps=1e-5, sliding_window=4096, max_position_embeddings=32768),
    image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
)
torch.manual_seed(0)
model = Idefics2ForConditionalGeneration(cfg).eval()
model.generation_config.eos_token_id = 32002  # never produced in practice: fixed-length decode
model.generation_config.pad_token_id = 0
model.save_pretrained(args.out)
del model
ip = Idefics2ImageProcessorPil(size={"shortest_edge": 378, "longest_edge": 980}, do_image_splitting=False)
tmpl = open(os.path.join(fixture, "chat_template.jinja")).read()
Idefics2Processor(ip, tok, image_seq_len=64, chat_template=tmpl).save_pretrained(args.out)
print("wrote", args.out)
