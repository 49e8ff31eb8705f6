#!/usr/bin/env python3
"""transformers side of bench.sh: prefill ms per image (and its phases) and decode tokens/s,
CPU, f32 or bf16 (optional fifth argument: the whole model in torch.bfloat16)."""
import json, resource, sys, time
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

ckpt, image, threads, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[sys.argv[5] if len(sys.argv) > 5 else "f32"]
torch.set_num_threads(threads)
proc = AutoProcessor.from_pretrained(ckpt)
model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=dtype).eval()
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Convert this page to docling."}]}]
text = proc.apply_chat_template(msgs, add_generation_prompt=True)
img = Image.open(image)

# Wall time of the model's parts in a prefill, the same phases as quire's profile: the
# processor ("prepare"), the vision encoder, the connector (Idefics2: modality projection and
# perceiver) and the text model's first forward ("prefill", its lm_head included).
inner = model.model
parts = {"vision": inner.vision_model, "connector": inner.connector, "prefill": inner.text_model}
phase = {}

def timed(name, module):
    def pre(*_):
        if name not in phase:
            phase[name] = -time.perf_counter()
    def post(*_):
        if phase.get(name, 0) < 0:
            phase[name] += time.perf_counter()
    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)

for name, module in parts.items():
    timed(name, module)

class Stamps:
    """generate's streamer: the time of each put (the prompt's, then one per new token)."""
    def __init__(self):
        self.t = []
    def put(self, _):
        self.t.append(time.perf_counter())
    def end(self):
        pass

stamps = Stamps()

def run(n):
    phase.clear()
    stamps.t.clear()
    t = time.perf_counter()
    enc = proc(text=[text], images=[[img]], return_tensors="pt")
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    phase["prepare"] = time.perf_counter() - t
    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=stamps)
    return time.perf_counter() - t, g.shape[1] - enc["input_ids"].shape[1], enc["input_ids"].shape[1]

run(2)  # warm-up
t1, phases = float("inf"), {}
for _ in range(3):
    t = run(1)[0]
    if t < t1:
        t1, phases = t, {k: v * 1e3 for k, v in phase.items()}
tn, made, tin = run(new)
# Decode rate from the new tokens' timestamps (first to last: made - 1 steps), as quire's from
# its step timers; the full run less the best prefill swings with the prefill's noise.
wall = (made - 1) / (tn - t1)
steps = stamps.t[1:]
decode = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) == made and made > 1 else wall
print(json.dumps({"impl": "transformers", "prefill_ms": t1 * 1e3, "decode_tok_s": decode, "decode_tok_s_wall": wall,
                  "tokens_in": tin, "tokens_out": made, "phases_ms": phases,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
