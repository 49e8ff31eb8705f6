#!/usr/bin/env python3
"""Writes a random-weight checkpoint with SmolVLM-256M-Instruct's dimensions (not committed).

usage: make_ckpt.py OUT_DIR   (reuses the fixture tokenizer; real vocab size 49280 in the model)
"""
import json, os, shutil, sys
import torch
from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

out = sys.argv[1]
fixture = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "idefics3", "split_sf2_gqa")
shutil.rmtree(out, ignore_errors=True)
tok = AutoTokenizer.from_pretrained(fixture)
cfg = Idefics3Config(
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16),
    text_config=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49280, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                     max_position_embeddings=8192, tie_word_embeddings=False),
    scale_factor=4, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
)
torch.manual_seed(0)
model = Idefics3ForConditionalGeneration(cfg).eval()
model.generation_config.eos_token_id = 49279  # never produced in practice: fixed-length decode
model.generation_config.pad_token_id = 0
model.save_pretrained(out)
# single 512x512 tile per image (size.longest_edge 512) to keep a 2-core CPU run short
ip = Idefics3ImageProcessorPil(size={"longest_edge": 512}, max_image_size={"longest_edge": 512})
tmpl = open(os.path.join(fixture, "chat_template.jinja")).read()
Idefics3Processor(ip, tok, image_seq_len=64, chat_template=tmpl).save_pretrained(out)
print("wrote", out)
