#!/usr/bin/env python3
"""Writes a random-weight checkpoint with SmolVLM-256M-Instruct's dimensions (not committed).

usage: make_ckpt.py OUT_DIR [--page] [--min-new N]
  (reuses the fixture tokenizer; real vocab size 49280 in the model)
  default   one 512x512 tile per image (size.longest_edge 512): keeps a 2-core CPU run short;
            OUT_DIR/page.png is a 360x480 image
  --page    SmolVLM's processor sizes (longest edge 2048, 512 px tiles) and OUT_DIR/page.png,
            a 1536x2048 page: 4x3 tiles + the global image = 13 tiles = 832 image tokens
  --min-new N   min_new_tokens in generation_config.json: quire and transformers both decode
            exactly N tokens when asked for N (the EOS id is one the model never needs)

Works with transformers 5.x (tested on 5.17 and 5.24): the rope setting is given as
`rope_parameters` where the Llama config knows it, else as the older `rope_theta`.
"""
import argparse, inspect, os, shutil
import torch
from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
from transformers.models.llama.configuration_llama import LlamaConfig

try:  # PIL backend of the image processor (5.x); older layouts only have the one class
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as ImageProcessor
except ImportError:
    from transformers import Idefics3ImageProcessor as ImageProcessor

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--page", action="store_true")
ap.add_argument("--min-new", type=int, default=0)
args = ap.parse_args()
out = args.out
fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "idefics3", "split_sf2_gqa")
shutil.rmtree(out, ignore_errors=True)
tok = AutoTokenizer.from_pretrained(fixture)
text = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, vocab_size=49280, rms_norm_eps=1e-5,
            max_position_embeddings=8192, tie_word_embeddings=False)
if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
else:
    text["rope_theta"] = 100000.0
cfg = Idefics3Config(
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16),
    text_config=text,
    scale_factor=4, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
)
tc = cfg.text_config
theta = getattr(tc, "rope_theta", None) or (getattr(tc, "rope_parameters", None) or {}).get("rope_theta")
assert theta == 100000.0, f"rope theta not taken: {theta}"
torch.manual_seed(0)
model = Idefics3ForConditionalGeneration(cfg).eval()
model.generation_config.eos_token_id = 49279  # never produced in practice: fixed-length decode
model.generation_config.pad_token_id = 0
if args.min_new:
    model.generation_config.min_new_tokens = args.min_new
model.save_pretrained(out)
if args.page:
    ip = ImageProcessor(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
else:
    ip = ImageProcessor(size={"longest_edge": 512}, max_image_size={"longest_edge": 512})
tmpl = open(os.path.join(fixture, "chat_template.jinja")).read()
Idefics3Processor(ip, tok, image_seq_len=64, chat_template=tmpl).save_pretrained(out)
import numpy as np
from PIL import Image
h, w = (2048, 1536) if args.page else (480, 360)
Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8)).save(os.path.join(out, "page.png"))
print("wrote", out)
