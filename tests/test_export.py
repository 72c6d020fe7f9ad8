"""Export to plain transformers (LlavaForConditionalGeneration + LlavaProcessor) and the batched evaluation.

The end-to-end tests export short mini runs and check that a process importing only transformers, torch and PIL
generates, text for text, what the project's own chat path generates for held-out images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llava_lib import process

N_IMAGES = 20
STAGE2_QUESTIONS = ("图中有几个图形？", "左上方的物体是什么颜色？")  # the second one follows the first reply

# Runs in a fresh interpreter: only transformers, torch and PIL. Every question goes to all images in one batch
# (left padding), in the llava-hf message format; later questions keep the earlier turns as history.
HF_ONLY = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

job = json.loads(sys.argv[1])
model = LlavaForConditionalGeneration.from_pretrained(job["export"]).eval()
proc = AutoProcessor.from_pretrained(job["export"])
images = [Image.open(p) for p in job["images"]]
chats, replies = [[] for _ in images], []
for k, question in enumerate(job["questions"]):
    for chat in chats:
        chat.append({"role": "user", "content": [{"type": "image"}] * (k == 0) + [{"type": "text", "text": question}]})
    prompts = [proc.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    inputs = proc(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=job["max_new_tokens"], do_sample=False)
    texts = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for chat, text in zip(chats, texts):
        chat.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    replies.append(texts)
assert not [m for m in sys.modules if m.startswith("llava_lib")]
print(json.dumps(replies, ensure_ascii=False))
"""


def run_hf_only(export_dir, images, questions, max_new_tokens, tmp_path) -> list[list[str]]:
    paths = []
    for i, im in enumerate(images):  # PNG: the subprocess reads exactly these pixels
        paths.append(str(tmp_path / f"{i:03d}.png"))
        im.save(paths[-1])
    job = json.dumps({"export": str(export_dir), "images": paths, "questions": list(questions),
                      "max_new_tokens": max_new_tokens})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", HF_ONLY, job], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- fast checks
def test_chat_template_renders_what_training_rendered(mini_world):
    """llava-hf part lists and ``<image>`` strings both render the text training rendered (image block of one slot:
    the processor repeats it), with thinking off unless asked for."""
    from transformers import AutoTokenizer

    from llava_lib.export import TEMPLATE_PRELUDE
    root, _ = mini_world
    tok = AutoTokenizer.from_pretrained(str(root / "llm"))
    template = TEMPLATE_PRELUDE + tok.chat_template
    img = f"{process.IMAGE_MARKER}\n{process.DEFAULT_PROMPT}"
    conversations = [
        [{"role": "user", "content": img}],
        [{"role": "system", "content": "你是看图助手。"}, {"role": "user", "content": img},
         {"role": "assistant", "content": "图中有两个物体。"}, {"role": "user", "content": "左上方是什么？"}],
        [{"role": "user", "content": "你好"}],
    ]

    def llava_hf(conv):
        return [{**m, "content": [{"type": "image"}] * m["content"].startswith(process.IMAGE_MARKER)
                 + [{"type": "text", "text": m["content"].removeprefix(f"{process.IMAGE_MARKER}\n")}]}
                if m["role"] == "user" else m for m in conv]

    for conv in conversations:
        for generation_prompt in (True, False):
            for thinking in (None, True, False):
                kw = {} if thinking is None else {"enable_thinking": thinking}
                want = process.render_chat(tok, conv, 1, generation_prompt, enable_thinking=bool(thinking))
                for c in (conv, llava_hf(conv)):
                    assert tok.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt,
                                                   chat_template=template, **kw) == want, (c, thinking)


@pytest.mark.slow
def test_mlp_projection_at_another_layer_exports_exactly(mini_world, tmp_path):
    """``mlp2x_gelu`` at ``feature_layer=-2``: the export's pixels (also of a non-square photo), image features and
    prompt ids are the project's."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_lib.export import export
    from llava_lib.model.checkpoint import save_projection
    from llava_lib.model.loading import build_model
    torch.manual_seed(3)
    model, tok = build_model(device="cpu", projector_type="mlp2x_gelu", feature_layer=-2)
    with torch.no_grad():  # far from its init, so that a wrong layer or activation shows
        for p in model.projector.parameters():
            p.normal_(0, 0.5)
    save_projection(tmp_path / "ckpt", model)
    out = export(tmp_path / "ckpt", tmp_path / "hf", profile="mini")
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert (cfg["vision_feature_layer"], cfg["projector_hidden_act"], cfg["image_seq_length"]) == (-2, "gelu", 197)
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    proc = AutoProcessor.from_pretrained(str(out))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (427, 640, 3), dtype=np.uint8))
    pixels = proc.image_processor(images=[photo], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, process.clip_transform(photo).unsqueeze(0))
    with torch.no_grad():
        want = model.project_images(pixels)
        got = hf.model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert torch.allclose(got, want[0], atol=1e-5), (got - want[0]).abs().max()
    prompt = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": process.DEFAULT_PROMPT}]}], add_generation_prompt=True)
    ids = proc(images=photo, text=prompt)["input_ids"][0]
    assert ids == process.encode_conversation(tok, process.caption_conversation(None), 197,
                                              add_generation_prompt=True)[0]


# ------------------------------------------------------------------------------------ end to end, mini runs
@pytest.fixture(scope="module")
def stage2_run(stage1_run, tmp_path_factory):
    """A few Stage 2 steps from the shared Stage 1 run: the LLM differs from the base one."""
    from llava_lib.train import TrainConfig, train
    out = tmp_path_factory.mktemp("stage2")
    train(TrainConfig.for_profile("mini", stage=2, stage1=str(stage1_run), out_dir=str(out), max_steps=10,
                                  batch_size=8, eval_limit=8, answer_eval_n=0, caption_show_n=0, eval_every=0,
                                  save_every=0, progress=False, tensorboard=False))
    return out


@pytest.mark.slow
def test_stage1_export_and_evaluation_match_the_chat_path_and_the_trainer(stage1_run, tmp_path):
    from llava_lib import evaluate, train
    from llava_lib.chat import caption
    from llava_lib.export import export
    model, tok, cfg = evaluate.load(stage1_run, device="cpu")
    _, _, ds, idx, _ = train.stage1_data(cfg.paths, cfg)
    images = [ds.image(i) for i in idx[:N_IMAGES]]
    ours = [caption(model, tok, im, max_new_tokens=evaluate.MAX_NEW_TOKENS[1]) for im in images]
    assert len(set(ours)) > N_IMAGES // 2  # varied replies, so equality means something

    # The evaluation on the trainer's images (its caption_eval_n) and settings, batched (4 a batch: a partial
    # last batch too), reports the trainer's accuracy.
    result = evaluate.evaluate(model, tok, cfg, batch_size=4, sequential_n=0)
    assert [r["generated"] for r in result["replies"]] == ours[:cfg.caption_eval_n]
    trainer = json.loads((stage1_run / "metrics.json").read_text(encoding="utf-8"))
    assert result["metrics"]["caption_accuracy"] == trainer["caption_accuracy_after"]
    assert 0 <= result["metrics"]["bleu4"] <= 1 and result["metrics"]["clipscore"] > 0

    out = export(stage1_run, tmp_path / "hf")
    cfg_json = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert (cfg_json["projector_hidden_act"], cfg_json["vision_feature_select_strategy"],
            cfg_json["image_token_index"]) == ("linear", "full", process.IMAGE_PAD_ID)
    assert "Stage 1" in (out / "README.md").read_text(encoding="utf-8")
    assert run_hf_only(out, images, [process.DEFAULT_PROMPT], evaluate.MAX_NEW_TOKENS[1], tmp_path) == [ours]
    # The export evaluates as the run does.
    model2, tok2, cfg2 = evaluate.load(out)
    assert evaluate.evaluate(model2, tok2, cfg2, sequential_n=0, clipscore=False)["replies"] == result["replies"]


@pytest.mark.slow
def test_stage2_export_answers_two_turns_like_the_chat_path(stage2_run, tmp_path):
    from llava_lib import evaluate, train
    from llava_lib.chat import ChatSession, answer_turns
    from llava_lib.export import export
    from llava_lib.mini.qa import answer_is_correct
    model, tok, cfg = evaluate.load(stage2_run, device="cpu")
    ds, _, _, idx, _ = train.stage2_data(cfg.paths, cfg)
    images = [ds.image(i) for i in idx[:N_IMAGES]]
    ours = [[], []]
    for im in images:
        session = ChatSession(model, tok, image=im, generation={"do_sample": False, "max_new_tokens": 32})
        for k, q in enumerate(STAGE2_QUESTIONS):
            ours[k].append(session.ask(q))
    assert len(set(ours[0] + ours[1])) > 3

    # Batched answers over held-out conversations (with their reference history) equal the chat path's.
    pairs = [p for i in idx[:4] for p in answer_turns(model, tok, ds.image(i), ds.conversations[i], 32)]
    result = evaluate.evaluate(model, tok, cfg, n=4, sequential_n=0)
    assert [(r["generated"], r["reference"]) for r in result["replies"]] == pairs
    assert result["metrics"]["answer_accuracy"] == train.caption_accuracy(pairs, answer_is_correct)

    out = export(stage2_run, tmp_path / "hf")
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    exported = LlavaForConditionalGeneration.from_pretrained(str(out)).model.language_model.layers[0].mlp.up_proj.weight
    base = load_file(str(cfg.paths.llm_path / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(exported, model.llm.model.layers[0].mlp.up_proj.weight) and not torch.equal(exported, base)
    assert run_hf_only(out, images, STAGE2_QUESTIONS, 32, tmp_path) == ours
