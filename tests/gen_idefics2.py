#!/usr/bin/env python3
"""Writes tiny random-weight Idefics2 checkpoints plus transformers reference outputs.

Pinned reference stack (what the committed fixtures were made with; the same versions as
tests/gen_idefics3.py's fixtures):
    torch==2.15.0 transformers==5.24.0 tokenizers==0.23.3 pillow==13.0.0 numpy==2.4.6
    safetensors pypdfium2==5.15.2, Python 3.11, no torchvision (so AutoProcessor picks the
    PIL image processor, Idefics2ImageProcessorPil).
Installed from PyPI into ~/.cache/quire-tools/venv-ref:
    python3 -m venv ~/.cache/quire-tools/venv-ref
    ~/.cache/quire-tools/venv-ref/bin/pip install torch==2.15.0 transformers==5.24.0 \
        pillow safetensors numpy pypdfium2==5.15.2
(PyPI's Linux torch wheel is the CUDA build: it needs its nvidia-*/cuda-* dependency wheels
even to import on the CPU; `--no-deps` leaves `import torch` failing on libcublasLt.)

    ~/.cache/quire-tools/venv-ref/bin/python tests/gen_idefics2.py          # checkpoints
    ~/.cache/quire-tools/venv-ref/bin/python tests/gen_idefics2.py pdf      # scanned PDF pages
    ~/.cache/quire-tools/venv-ref/bin/python tests/gen_idefics2.py lowp     # bf16/f16 drift
    ~/.cache/quire-tools/venv-ref/bin/python tests/gen_idefics2.py loops    # long outputs that loop

Output: tests/fixtures/idefics2/<checkpoint>/ (a loadable HF folder) with reference.json and
reference.safetensors (pixel values, pixel masks, first-step logits), pdf_pages/ and
lowp_reference.json (transformers' own bf16/f16 logit drift), and
nosplit_window_old/loops_reference.json (see `loops_reference`). The
input images are tests/fixtures/idefics3/images/ (shared, not rewritten here). The Rust
parity tests in crates/quire-vlm/tests/parity.rs and tests/pipeline.rs read these.
"""
import json
import os
import shutil
import sys
import zlib

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_idefics3 as g3  # noqa: E402  (PDF rendering like quire, shared)

ROOT = os.path.join(HERE, "fixtures", "idefics2")
IMAGES = os.path.join(HERE, "fixtures", "idefics3", "images")
MAX_NEW = 20

# Idefics2-8B's chat template.
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CORPUS = g3.CORPUS + [
    "User: What is in this picture? Assistant: A page of text with a table.",
    "Describe the scanned document: a letter, a receipt or a form.",
    "First line\nSecond line\n",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def build_tokenizer():
    """A small Llama-style tokenizer: BPE over Metaspace pieces, and a post-processor that
    puts <s> (BOS) in front of every encoded text, like Idefics2-8B's."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def make_tokenizer(src):
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(src.to_str()), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<unk>",
    )


# name -> settings. Every checkpoint has grouped-query heads somewhere; the sliding windows
# are shorter than the prompts so the window changes the output.
CHECKPOINTS = {
    # Newest layout as saved by this transformers: nested processor_config.json,
    # chat_template.jinja, rope_parameters. Splitting; GQA in the resampler and the text
    # model; no sliding window (null).
    "split_gqa": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=None),
        perceiver=dict(resampler_n_latents=6, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=16,
                       num_key_value_heads=2),
        proc=dict(do_image_splitting=True, size={"shortest_edge": 24, "longest_edge": 48}),
        tie=False, layout="new", eos=["<end_of_utterance>", "</s>"],
    ),
    # Older layout: flat preprocessor_config.json, rope_theta and torch_dtype at the top
    # level, chat_template.json, tied embeddings (no lm_head.weight). No splitting, one
    # resampler layer with plain multi-head attention, a sliding window of 12 tokens.
    "nosplit_window_old": dict(
        vision=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                    image_size=48, patch_size=8),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=3, sliding_window=12, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1000.0}),
        perceiver=dict(resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=24,
                       num_key_value_heads=2),
        proc=dict(do_image_splitting=False, size={"shortest_edge": 16, "longest_edge": 40}),
        tie=True, layout="old", eos=["<end_of_utterance>", "auto"],
    ),
    # Sharded safetensors with an index, template in tokenizer_config.json, splitting,
    # bicubic resampling, ImageNet mean/std, a three-layer resampler with 6 query heads over
    # 3 KV heads, one KV head in the text model, a 24-token sliding window.
    "split_deep_sharded": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=64, patch_size=8, layer_norm_eps=1e-5),
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, sliding_window=24, rms_norm_eps=1e-5),
        perceiver=dict(resampler_n_latents=4, resampler_depth=3, resampler_n_heads=6, resampler_head_dim=8,
                       num_key_value_heads=3),
        proc=dict(do_image_splitting=True, size={"shortest_edge": 20, "longest_edge": 56}, resample=3,
                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
        tie=False, layout="sharded", eos=["<end_of_utterance>", "</s>"],
    ),
}

PROMPTS = ["Describe this image in one sentence.", "Read the text in the image. What is written here?"]


def write_checkpoint(name, spec, tok_src, seed):
    d = os.path.join(ROOT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    tokenizer = make_tokenizer(tok_src)
    vocab = len(tokenizer) + 10  # a few unused rows like real checkpoints
    ids = lambda t: tokenizer.convert_tokens_to_ids(t)  # noqa: E731
    eos_ids = [ids(t) for t in spec["eos"] if t != "auto"]
    cfg = Idefics2Config(
        vision_config=dict(spec["vision"], initializer_range=0.2),
        perceiver_config=dict(spec["perceiver"], hidden_size=spec["text"]["hidden_size"], initializer_range=0.2),
        text_config=dict(spec["text"], model_type="mistral", vocab_size=vocab, initializer_range=0.15,
                         tie_word_embeddings=spec["tie"], pad_token_id=0, bos_token_id=ids("<s>"),
                         eos_token_id=ids("</s>"), max_position_embeddings=4096),
        image_token_id=ids("<image>"), tie_word_embeddings=spec["tie"],
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(cfg).eval()
    # random init gives near-uniform logits and ones for the latents; spread them so greedy
    # picks are well separated and every latent differs
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "norm" in n and n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif n.endswith("latents"):
                p.copy_(torch.randn_like(p))
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = ids("<s>")
    shard = "20KB" if spec["layout"] == "sharded" else "5GB"
    model.save_pretrained(d, max_shard_size=shard)
    ip = Idefics2ImageProcessorPil(**spec["proc"])
    proc = Idefics2Processor(ip, tokenizer, image_seq_len=spec["perceiver"]["resampler_n_latents"],
                             chat_template=IDEFICS2_TEMPLATE)
    proc.save_pretrained(d)
    if spec["layout"] == "old":
        to_old_layout(d)
    elif spec["layout"] == "sharded":
        tmpl = open(os.path.join(d, "chat_template.jinja")).read()
        os.remove(os.path.join(d, "chat_template.jinja"))
        tcp = os.path.join(d, "tokenizer_config.json")
        tk = json.load(open(tcp))
        tk["chat_template"] = tmpl
        json.dump(tk, open(tcp, "w"), indent=2)
    return d


def to_old_layout(d):
    """Rewrite what this transformers saved into the layout older versions (4.4x) wrote."""
    cfgp = os.path.join(d, "config.json")
    cfg = json.load(open(cfgp))
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    tc = cfg["text_config"]
    rp = tc.pop("rope_parameters")
    tc["rope_theta"] = rp["rope_theta"]
    tc.pop("head_dim", None)  # omitted default
    cfg["vision_config"].pop("num_channels", None)
    cfg["vision_config"].pop("layer_norm_eps", None)
    json.dump(cfg, open(cfgp, "w"), indent=2)
    pc = json.load(open(os.path.join(d, "processor_config.json")))
    ipc = pc.pop("image_processor")
    ipc["processor_class"] = "Idefics2Processor"
    json.dump(ipc, open(os.path.join(d, "preprocessor_config.json"), "w"), indent=2)
    json.dump(pc, open(os.path.join(d, "processor_config.json"), "w"), indent=2)
    tmpl = open(os.path.join(d, "chat_template.jinja")).read()
    os.remove(os.path.join(d, "chat_template.jinja"))
    json.dump({"chat_template": tmpl}, open(os.path.join(d, "chat_template.json"), "w"), indent=2)
    tcp = os.path.join(d, "tokenizer_config.json")
    tk = json.load(open(tcp))
    tk["additional_special_tokens"] = tk.pop("extra_special_tokens", [])
    tk["tokenizer_class"] = "PreTrainedTokenizerFast"
    tk.pop("backend", None)
    json.dump(tk, open(tcp, "w"), indent=2)


def load_images():
    return {n: Image.open(os.path.join(IMAGES, n)) for n in sorted(os.listdir(IMAGES)) if n.endswith(".png")}


def reference(d, images):
    processor = AutoProcessor.from_pretrained(d)
    assert "Pil" in type(processor.image_processor).__name__, type(processor.image_processor)
    model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    tok = processor.tokenizer
    window = model.config.text_config.sliding_window
    cases, tensors = [], {}
    for i, name in enumerate(sorted(images)):
        prompt = PROMPTS[i % len(PROMPTS)]
        text = g3.render(processor, prompt)
        enc = processor(text=[text], images=[[images[name]]], return_tensors="pt")
        with torch.no_grad():
            out = model(**enc)
            gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        new = gen.sequences[0, enc["input_ids"].shape[1]:].tolist()
        top2 = torch.stack([s[0] for s in gen.scores]).topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        mask = enc["pixel_attention_mask"][0]
        frames = [[int(m[:, 0].sum()), int(m[0, :].sum())] for m in mask]
        window_effect = None
        if window is not None:
            # how much the first-step logits move without the window: the fixture exercises it
            model.config.text_config.sliding_window = None
            with torch.no_grad():
                full = model(**enc).logits[0, -1]
            model.config.text_config.sliding_window = window
            window_effect = float((full - out.logits[0, -1]).abs().max())
        key = name.replace(".png", "")
        tensors[f"{key}.pixel_values"] = enc["pixel_values"][0].contiguous()
        tensors[f"{key}.pixel_attention_mask"] = mask.to(torch.int64).contiguous()
        tensors[f"{key}.logits"] = out.logits[0, -1].contiguous()
        cases.append(dict(
            image=name, prompt=prompt, rendered_prompt=text, frames=frames,
            input_ids=enc["input_ids"][0].tolist(), new_tokens=new,
            text=tok.decode(new, skip_special_tokens=True), min_top2_margin=margin,
            logits_change_without_sliding_window=window_effect,
        ))
    # batched reference (left padding) across all images, for information
    tok.padding_side = "left"
    texts = [g3.render(processor, c["prompt"]) for c in cases]
    enc = processor(text=texts, images=[[images[c["image"]]] for c in cases], return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
    batched = [gen[i, enc["input_ids"].shape[1]:].tolist() for i in range(len(cases))]
    meta = dict(transformers_version=transformers.__version__, torch_version=torch.__version__,
                max_new_tokens=MAX_NEW, image_processor=type(processor.image_processor).__name__,
                image_seq_len=processor.image_seq_len, sliding_window=window,
                do_image_splitting=processor.image_processor.do_image_splitting,
                cases=cases, hf_batched_new_tokens=batched)
    json.dump(meta, open(os.path.join(d, "reference.json"), "w"), indent=1)
    save_file(tensors, os.path.join(d, "reference.safetensors"))
    return meta


PDF_DIR = os.path.join(ROOT, "pdf_pages")
PDF_PAGES = [("scanned.pdf", 1)]
PDF_CHECKPOINTS = ["split_gqa", "nosplit_window_old"]
PDF_PROMPT = "Convert this page to docling."


def pdf_reference():
    """Scanned PDF pages rendered like quire at the long side `quire run --model` picks,
    and transformers' greedy output on those pixels (pdf_pages/reference.json)."""
    os.makedirs(PDF_DIR, exist_ok=True)
    out = dict(transformers_version=transformers.__version__, max_new_tokens=MAX_NEW, prompt=PDF_PROMPT, cases=[])
    for name in PDF_CHECKPOINTS:
        d = os.path.join(ROOT, name)
        long_side = g3.long_side_of(d)
        processor = AutoProcessor.from_pretrained(d)
        model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
        for doc, page_no in PDF_PAGES:
            png = f"{doc.replace('.pdf', '')}_p{page_no}_{long_side}.png"
            img = g3.render_like_quire(os.path.join(g3.DOCS, doc), page_no, long_side)
            img.save(os.path.join(PDF_DIR, png))
            img = Image.open(os.path.join(PDF_DIR, png))
            text = g3.render(processor, PDF_PROMPT)
            enc = processor(text=[text], images=[[img]], return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
            new = gen.sequences[0, enc["input_ids"].shape[1]:].tolist()
            top2 = torch.stack([s[0] for s in gen.scores]).topk(2, dim=-1).values
            out["cases"].append(dict(
                checkpoint=name, document=doc, page=page_no, long_side=long_side, png=png,
                width=img.width, height=img.height, input_ids=enc["input_ids"][0].tolist(), new_tokens=new,
                text=processor.tokenizer.decode(new, skip_special_tokens=True),
                min_top2_margin=float((top2[:, 0] - top2[:, 1]).min()),
            ))
            print("pdf", name, doc, page_no, img.size, new[:8], "margin=%.4f" % out["cases"][-1]["min_top2_margin"])
    json.dump(out, open(os.path.join(PDF_DIR, "reference.json"), "w"), indent=1)


def lowp_reference(images):
    """How far transformers' own first-step logits move when a checkpoint runs in bf16 or
    f16 instead of f32 (max |low - f32| per case): lowp_reference.json, the yardstick of
    quire's low-precision test."""
    out = dict(transformers_version=transformers.__version__, torch_version=torch.__version__, checkpoints={})
    for name in CHECKPOINTS:
        d = os.path.join(ROOT, name)
        processor = AutoProcessor.from_pretrained(d)
        ref = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
        res = {}
        for label, dtype in [("bf16", torch.bfloat16), ("f16", torch.float16)]:
            model = AutoModelForImageTextToText.from_pretrained(d, dtype=dtype).eval()
            res[label] = {}
            for i, img in enumerate(sorted(images)):
                text = g3.render(processor, PROMPTS[i % len(PROMPTS)])
                enc = processor(text=[text], images=[[images[img]]], return_tensors="pt")
                with torch.no_grad():
                    want = ref(**enc).logits[0, -1].float()
                    got = model(**dict(enc, pixel_values=enc["pixel_values"].to(dtype))).logits[0, -1].float()
                res[label][img.replace(".png", "")] = dict(
                    max_abs_diff=float((got - want).abs().max()), max_abs_logit=float(want.abs().max()))
        out["checkpoints"][name] = res
        print("lowp", name, {k: max(c["max_abs_diff"] for c in v.values()) for k, v in res.items()})
    json.dump(out, open(os.path.join(ROOT, "lowp_reference.json"), "w"), indent=1)


# Runaway generation. The 12-token sliding window of nosplit_window_old makes its greedy output
# depend only on its latest tokens once the prompt is out of the window, so some pages settle
# into a repeated period (as real models' runaway pages do) while others end with EOS.
LOOP_CHECKPOINT = "nosplit_window_old"
LOOP_PROMPTS = ["Describe this image in one sentence.", "Convert this page to docling."]
LOOP_MAX_NEW = 480
LOOP_MAX_PERIOD = 64
LOOP_MIN_TOKENS = (128, 256)
LOOP_RETRY_PENALTY = 1.1


class LoopWatch:
    """quire's loop rule (crates/quire-vlm/src/loops.rs), written again here: after each new
    token, whether the generated ids end in a period of at most max_period tokens repeated
    over at least min_tokens tokens (ids in `wild` equal to each other)."""

    def __init__(self, wild, max_period, min_tokens):
        self.wild, self.min_tokens, self.runs, self.ids = wild, min_tokens, [0] * max_period, []

    def push(self, last):
        ids, n, hit = self.ids, len(self.ids) + 1, None
        ids.append(last)
        for p in range(1, len(self.runs) + 1):
            prev = ids[n - 1 - p] if n > p else None
            same = prev is not None and (prev == last or (prev in self.wild and last in self.wild))
            self.runs[p - 1] = self.runs[p - 1] + 1 if same else 0
            if hit is None and self.runs[p - 1] > 0 and self.runs[p - 1] + p >= self.min_tokens:
                hit = dict(found_at=n, period=p, start=n - self.runs[p - 1] - p, keep=n - self.runs[p - 1])
        return hit


def find_loop(new, eos, min_tokens, wild=frozenset()):
    """Where quire's rule first holds in `new` (found_at, period, start, keep), or None."""
    watch = LoopWatch(wild, LOOP_MAX_PERIOD, min_tokens)
    for t in new:
        if t in eos:
            return None
        hit = watch.push(t)
        if hit:
            return hit
    return None


def loops_reference(images):
    """Greedy outputs of LOOP_MAX_NEW tokens on every (image, prompt) pair, where quire's rule
    first holds in them for each of LOOP_MIN_TOKENS, and for those that loop the output of
    generate(repetition_penalty=LOOP_RETRY_PENALTY), what `--on-loop retry` runs:
    LOOP_CHECKPOINT/loops_reference.json. The checkpoint itself is not rewritten."""
    d = os.path.join(ROOT, LOOP_CHECKPOINT)
    processor = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    e = model.generation_config.eos_token_id
    eos = set(e if isinstance(e, list) else [e])
    cases = []
    for name in sorted(images):
        for prompt in LOOP_PROMPTS:
            enc = processor(text=[g3.render(processor, prompt)], images=[[images[name]]], return_tensors="pt")
            case = dict(image=name, prompt=prompt, input_ids=enc["input_ids"][0].tolist())
            for label, penalty in [("", 1.0), ("retry_", LOOP_RETRY_PENALTY)]:
                with torch.no_grad():
                    gen = model.generate(**enc, max_new_tokens=LOOP_MAX_NEW, do_sample=False, output_scores=True,
                                         return_dict_in_generate=True, repetition_penalty=penalty)
                new = gen.sequences[0, enc["input_ids"].shape[1]:].tolist()
                top2 = torch.stack([s[0] for s in gen.scores]).topk(2, dim=-1).values
                margins = (top2[:, 0] - top2[:, 1]).tolist()
                loops = {str(m): find_loop(new, eos, m) for m in LOOP_MIN_TOKENS}
                # headroom of the greedy picks up to where quire stops at the larger limit
                stop = loops[str(LOOP_MIN_TOKENS[-1])]
                case.update({f"{label}new_tokens": new, f"{label}loops": loops,
                             f"{label}min_top2_margin": float(min(margins[:stop["found_at"] if stop else len(new)]))})
                if stop is None:
                    break
            cases.append(case)
            print("loops", name, prompt[:10], len(case["new_tokens"]), case["loops"][str(LOOP_MIN_TOKENS[-1])],
                  "retry" in "".join(case), "margin=%.4f" % case["min_top2_margin"], flush=True)
    meta = dict(transformers_version=transformers.__version__, torch_version=torch.__version__,
                max_new_tokens=LOOP_MAX_NEW, loop_max_period=LOOP_MAX_PERIOD, retry_penalty=LOOP_RETRY_PENALTY,
                cases=cases)
    json.dump(meta, open(os.path.join(d, "loops_reference.json"), "w"), indent=1)


def main():
    torch.set_num_threads(2)
    images = load_images()
    tok = build_tokenizer()
    only = sys.argv[1:]
    if only == ["loops"]:
        loops_reference(images)
        return
    if "pdf" in only:
        pdf_reference()
    if "lowp" in only:
        lowp_reference(images)
    if {"pdf", "lowp"} & set(only):
        only = [o for o in only if o not in ("pdf", "lowp")]
        if not only:
            return
    for name, spec in CHECKPOINTS.items():
        if only and name not in only:
            continue
        # re-seed until every greedy step has a clear winner, so float noise cannot flip a token
        for attempt in range(20):
            seed = zlib.crc32(name.encode()) % 1000 + attempt
            d = write_checkpoint(name, spec, tok, seed)
            meta = reference(d, images)
            if "auto" in spec["eos"]:
                # make an ordinary token an extra EOS id so some runs stop early (FinishReason::Stop)
                gc_path = os.path.join(d, "generation_config.json")
                gc = json.load(open(gc_path))
                first = gc["eos_token_id"] if isinstance(gc["eos_token_id"], list) else [gc["eos_token_id"]]
                gc["eos_token_id"] = first + [meta["cases"][0]["new_tokens"][5]]
                json.dump(gc, open(gc_path, "w"), indent=2)
                meta = reference(d, images)
            ok_window = all(c["logits_change_without_sliding_window"] is None
                            or c["logits_change_without_sliding_window"] > 1e-2 for c in meta["cases"])
            if min(c["min_top2_margin"] for c in meta["cases"]) > 2e-3 and ok_window:
                break
        print(name, "seed", seed)
        for c in meta["cases"]:
            print(name, c["image"], c["frames"], len(c["input_ids"]), c["new_tokens"][:8],
                  "margin=%.4f" % c["min_top2_margin"], "window=%s" % c["logits_change_without_sliding_window"],
                  repr(c["text"][:40]))


if __name__ == "__main__":
    main()
