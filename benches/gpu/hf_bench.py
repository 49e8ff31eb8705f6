#!/usr/bin/env python3
"""transformers side of benches/gpu/check.sh: batched `generate` throughput.

usage: hf_bench.py CKPT IMAGE NEW --device cuda --dtype bf16 --batches 1,8,32,64 [--budget-s S]

Per batch size, like quire's `bench --batch`: a 2-token warm-up, a 1-token call (prefill), then
NEW tokens forced (min_new_tokens = max_new_tokens = NEW); the processor call is inside the
timed region. One JSON line per batch size, flushed at once so a later timeout keeps it;
batch sizes still to run when --budget-s is (nearly) spent are reported as skipped.
"""
import argparse, json, os, sys, time
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Idefics3Processor


def load_processor(ckpt):
    """AutoProcessor, else (an environment where auto resolution finds no usable image
    processor backend, seen with transformers 5.17 without torchvision) the same processor
    built from the checkpoint's own files with the PIL image processor."""
    try:
        return AutoProcessor.from_pretrained(ckpt)
    except (ValueError, ImportError) as e:
        print(f"AutoProcessor failed ({str(e)[:160]}); building Idefics3Processor by hand", file=sys.stderr)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    cfg = json.load(open(os.path.join(ckpt, "processor_config.json")))
    ipc = {k: v for k, v in cfg["image_processor"].items() if k not in ("image_processor_type", "processor_class")}
    tmpl = open(os.path.join(ckpt, "chat_template.jinja")).read()
    return Idefics3Processor(Idefics3ImageProcessorPil(**ipc), AutoTokenizer.from_pretrained(ckpt),
                             image_seq_len=cfg.get("image_seq_len", 64), chat_template=tmpl)


ap = argparse.ArgumentParser()
ap.add_argument("ckpt")
ap.add_argument("image")
ap.add_argument("new", type=int)
ap.add_argument("--device", default="cuda")
ap.add_argument("--dtype", default="bf16")
ap.add_argument("--batches", default="1")
ap.add_argument("--budget-s", type=float, default=1e9)
ap.add_argument("--threads", type=int, default=0)
a = ap.parse_args()
start = time.perf_counter()
if a.threads:
    torch.set_num_threads(a.threads)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
dev = torch.device(a.device)
proc = load_processor(a.ckpt)
t = time.perf_counter()
model = AutoModelForImageTextToText.from_pretrained(a.ckpt, dtype=dtype).to(dev).eval()
load_s = time.perf_counter() - t
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Convert this page to docling."}]}]
text = proc.apply_chat_template(msgs, add_generation_prompt=True)
img = Image.open(a.image).convert("RGB")
proc.tokenizer.padding_side = "left"


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run(b, n):
    sync()
    t = time.perf_counter()
    enc = proc(text=[text] * b, images=[[img]] * b, return_tensors="pt", padding=True).to(dev)
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    with torch.inference_mode():
        g = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    sync()
    return time.perf_counter() - t, g.shape[1] - enc["input_ids"].shape[1], enc["input_ids"].shape[1]


for b in [int(x) for x in a.batches.split(",")]:
    left = a.budget_s - (time.perf_counter() - start)
    if left < 10:
        print(json.dumps({"impl": "transformers", "batch": b, "skipped": f"{left:.0f} s of the budget left"}), flush=True)
        continue
    try:
        tw = run(b, 2)[0]
        t1 = run(b, 1)[0]
        tn, made, tin = run(b, a.new)
    except torch.OutOfMemoryError as e:
        print(json.dumps({"impl": "transformers", "batch": b, "error": f"out of memory: {e}"[:300]}), flush=True)
        break
    print(json.dumps({"impl": "transformers", "device": a.device, "dtype": a.dtype, "batch": b, "new": a.new,
                      "seconds": tn, "pages_s": b / tn, "new_tok_s": b * made / tn, "prefill_s": t1, "warmup_s": tw,
                      "load_s": load_s, "tokens_in": tin, "tokens_out_min": made,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}),
          flush=True)
