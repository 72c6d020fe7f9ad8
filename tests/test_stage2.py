"""Stage 2: the CogVLM-SFT reader and its bad-input policy, the mini Q&A corpus, and training on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_single_and_ddp

from llava_lib import config
from llava_lib.data import make_collate
from llava_lib.data.conversations import LABELS_DIR, SFT_SUBSETS, ConversationDataset, split_indices
from llava_lib.process import IGNORE_INDEX, IMAGE_MARKER

REPO = Path(__file__).resolve().parents[1]
SINGLE, MULTI = SFT_SUBSETS


def _write(root: Path, subset: str, stem: str, label, image: bool | bytes = True) -> None:
    (root / subset / "images").mkdir(parents=True, exist_ok=True)
    (root / subset / LABELS_DIR).mkdir(parents=True, exist_ok=True)
    text = label if isinstance(label, str) else json.dumps(label, ensure_ascii=False)
    (root / subset / LABELS_DIR / f"{stem}.json").write_text(text, encoding="utf-8")
    if isinstance(image, bytes):
        (root / subset / "images" / f"{stem}.jpg").write_bytes(image)
    elif image:
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / subset / "images" / f"{stem}.jpg")


def _conv(*turns):
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture
def sft_folder(tmp_path):
    root = tmp_path / "sft"
    _write(root, SINGLE, "00000001", _conv(("user", "图里有什么？"), ("assistant", "一只猫。")))
    _write(root, MULTI, "00000001", _conv(("user", "这是哪里？"), ("assistant", "海边。"),
                                         ("user", "天气怎么样？"), ("assistant", "晴天。")))
    _write(root, SINGLE, "00000002", _conv(("user", "问题"), ("assistant", "回答")), image=False)
    _write(root, SINGLE, "00000003", '{"conversations": [{"role": "user", ')
    _write(root, SINGLE, "00000004", {"conversations": []})
    _write(root, SINGLE, "00000005", _conv(("assistant", "我先说。"), ("user", "好的")))
    _write(root, SINGLE, "00000006", _conv(("user", "问题"), ("narrator", "旁白")))
    _write(root, SINGLE, "00000007", _conv(("user", "   "), ("assistant", "回答")))
    _write(root, MULTI, "00000002", _conv(("user", "看图"), ("assistant", "好。")), image=b"not a jpeg")
    return root


def test_reader_keeps_good_conversations_and_names_every_bad_file(sft_folder):
    ds = ConversationDataset(sft_folder)
    # Two good ones plus one whose image only fails when it is decoded.
    assert len(ds) == 3 and ds.stats.kept == 3
    reasons = {Path(f).stem: r for f, r in ds.stats.bad}
    assert set(reasons) == {"00000002", "00000003", "00000004", "00000005", "00000006", "00000007"}
    assert "缺少图片" in reasons["00000002"] and reasons["00000003"] == "JSON 格式错误"
    assert "为空" in reasons["00000004"] and "不是从用户开始" in reasons["00000005"]
    assert "narrator" in reasons["00000006"] and "内容为空" in reasons["00000007"]
    assert "跳过 6 个坏样本" in ds.stats.summary()
    # The image goes into the first user turn, once; the other turns are as written.
    multi = next(c for c in ds.conversations if len(c) == 4)
    assert multi[0]["content"] == f"{IMAGE_MARKER}\n这是哪里？" and multi[2]["content"] == "天气怎么样？"
    assert sum(IMAGE_MARKER in m["content"] for m in multi) == 1


def test_an_undecodable_image_is_skipped_and_reported_by_the_collate(sft_folder, qwen_tokenizer):
    ds = ConversationDataset(sft_folder)
    items = [ds[i] for i in range(len(ds))]
    bad = [s for s in items if not isinstance(s, dict)]
    assert len(bad) == 1 and bad[0].reason == "bad_image" and "00000002.jpg" in bad[0].message
    batch = make_collate(qwen_tokenizer, n_image_tokens=5, max_text_tokens=64)(items)
    assert batch["input_ids"].shape[0] == 2 and len(batch["skipped"]) == 1
    assert batch["pixel_values"].shape == (2, 3, 224, 224)


def test_labels_cover_every_assistant_turn_and_its_end(sft_folder, qwen_tokenizer):
    ds = ConversationDataset(sft_folder)
    i = next(k for k, c in enumerate(ds.conversations) if len(c) == 4)
    batch = make_collate(qwen_tokenizer, n_image_tokens=5, max_text_tokens=64)([ds[i]])
    labels = batch["labels"][0]
    learned = qwen_tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert learned == "海边。<|im_end|>晴天。<|im_end|>"


def test_a_missing_folder_names_the_download_command(tmp_path):
    paths = config.resolve("full", sft_root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        ConversationDataset(paths.sft_root, how_to_get=config.how_to_get(paths, "sft_root"))
    assert "python -m llava_lib.download sft" in str(e.value)
    assert config.SFT_DATASET_ID == "ZhipuAI/CogVLM-SFT-311K"


def test_the_held_out_split_is_fixed_and_disjoint():
    a_train, a_eval = split_indices(1000, 0.02)
    b_train, b_eval = split_indices(1000, 0.02)
    assert (a_train, a_eval) == (b_train, b_eval) and len(a_eval) == 20
    assert not set(a_train) & set(a_eval) and len(a_train) + len(a_eval) == 1000


def test_stage2_defaults_follow_the_original_recipe_on_the_full_profile():
    full = config.TrainConfig.for_profile("full", stage=2)
    assert (full.lr, full.batch_size, full.max_text_tokens, full.gradient_checkpointing, full.max_grad_norm,
            full.warmup_ratio, full.eval_fraction) == (2e-5, 4, 512, True, 1.0, 0.03, 0.02)
    assert config.TrainConfig.for_profile("full", stage=2, lora=True).lr == 2e-4
    assert config.TrainConfig.for_profile("full", stage=2, lr=1e-5).lr == 1e-5  # what the user says wins
    assert config.TrainConfig.for_profile("full").lr == 2e-3  # Stage 1 untouched


# ------------------------------------------------------------------------------------------ the mini corpus
def test_mini_answers_are_checked_strictly():
    from llava_lib.mini.qa import answer_is_correct
    assert answer_is_correct("红色。", "红色。") and answer_is_correct("红色", "红色。")
    assert not answer_is_correct("蓝色。", "红色。")
    assert not answer_is_correct("左上方是一个红色的圆形。", "红色。")  # a caption-like reply is not an answer
    assert not answer_is_correct("有。", "没有。")


def test_mini_corpus_uses_only_words_the_mini_lm_knows(mini_world):
    """Every token of the Q&A is a live row of the mini LM (the others stay exactly zero through Stage 2)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    root, _ = mini_world
    tok = AutoTokenizer.from_pretrained(str(root / "llm"))
    emb = next(v for k, v in load_file(str(root / "llm" / "model.safetensors")).items() if "embed_tokens" in k)
    live = set((emb != 0).any(1).nonzero().flatten().tolist())
    ds = ConversationDataset(root / "sft", transform=None)
    from llava_lib.mini import qa
    assert ds.n_with_image == qa.N_SINGLE + qa.N_MULTI and len(ds) == ds.n_with_image + qa.N_TEXT_TRAIN
    assert not ds.stats.bad
    kinds = set()
    for conv in ds.conversations:
        for m in conv:
            text = m["content"].replace(IMAGE_MARKER, "")
            assert set(tok(text, add_special_tokens=False)["input_ids"]) <= live, text
            kinds.add(text.strip()[-4:])
    assert any(len(c) >= 4 for c in ds.conversations) and {"么颜色？", "么形状？", "个图形？"} <= kinds


# ------------------------------------------------------------------------------------------------ training
def _quick2(tmp_path, stage1, **kw):
    from llava_lib.train import TrainConfig
    base = dict(stage=2, stage1=str(stage1), out_dir=str(tmp_path), answer_eval_n=0, caption_show_n=0,
                eval_every=0, eval_limit=16, batch_size=8, progress=False, tensorboard=False)
    return TrainConfig.for_profile("mini", **{**base, **kw})


def test_stage2_step_trains_projection_and_llm_but_never_the_vision_tower(stage1_run, tmp_path):
    from llava_lib.train import setup, train_step
    run = setup(_quick2(tmp_path, stage1_run, max_steps=5))
    vision = {k: v.clone() for k, v in run.model.vision.state_dict().items()}
    llm = {k: v.clone() for k, v in run.model.llm.named_parameters()}
    proj = [p.detach().clone() for p in run.model.projector.parameters()]
    # A batch with images (text-only conversations, mixed into training, give the projection no gradient).
    micro = next(m for m in run.batches({"epoch": 0, "batch_in_epoch": 0}) if m[0]["pixel_values"] is not None)
    rec = train_step(run.model, micro, run.optimizer, run.scheduler, max_grad_norm=run.cfg.max_grad_norm)
    assert rec["n_tokens"] > 0 and "grad_norm" in rec
    assert all(torch.equal(vision[k], v) for k, v in run.model.vision.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(proj, run.model.projector.parameters()))
    changed = [k for k, v in run.model.llm.named_parameters() if not torch.equal(llm[k], v)]
    assert any("layers.0.self_attn.q_proj" in k for k in changed) and any("layers.2.mlp" in k for k in changed)
    # The mini profile keeps the (mostly zero) embedding table frozen; the full profile trains it.
    assert run.cfg.train_embeddings is False and not any("embed_tokens" in k for k in changed)
    assert config.TrainConfig.for_profile("full", stage=2).train_embeddings is True


def test_stage2_resume_continues_the_same_loss_curve(stage1_run, tmp_path):
    from llava_lib.train import latest_checkpoint, train
    full = train(_quick2(tmp_path / "a", stage1_run, max_steps=8, save_every=3, log_every=1))

    def interrupt_at_6(history):
        if history[-1]["step"] == 6:
            raise KeyboardInterrupt

    part = train(_quick2(tmp_path / "b", stage1_run, max_steps=8, save_every=3, log_every=1), on_log=interrupt_at_6)
    assert part.interrupted and latest_checkpoint(tmp_path / "b").name == "step-000006"
    assert (latest_checkpoint(tmp_path / "b") / "llm" / "model.safetensors").is_file()
    rest = train(_quick2(tmp_path / "b", stage1_run, max_steps=8, save_every=3, log_every=1, resume=True))
    a = {h["step"]: h["loss"] for h in full.history}
    b = {h["step"]: h["loss"] for h in rest.history}
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    # The final LLM is a plain Qwen3 directory, and its JSON names the stage and the Stage 1 parent.
    from transformers import Qwen3ForCausalLM
    llm = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "b" / "final" / "llm"))
    meta = json.loads((tmp_path / "b" / "final" / "projection.json").read_text(encoding="utf-8"))
    assert meta["stage"] == 2 and meta["stage1"].startswith(str(stage1_run)) and meta["model_ids"]["llm"]
    ref = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "a" / "final" / "llm"))
    for (k, p), (_, q) in zip(llm.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), k


def test_lora_trains_adapters_only_and_the_final_llm_has_them_merged(stage1_run, tmp_path):
    from llava_lib.model.loading import load_trained
    from llava_lib.train import train
    cfg = _quick2(tmp_path, stage1_run, max_steps=3, lora=True, save_every=2)
    assert cfg.lr == 2e-4
    train(cfg)
    assert (tmp_path / "checkpoints" / "step-000002" / "llm_lora" / "adapter_config.json").is_file()
    model, _, meta = load_trained(tmp_path / "final", device="cpu")
    assert meta["lora"] is True and meta["stage"] == 2
    names = [k for k, _ in model.llm.named_parameters()]
    assert not any("lora" in k for k in names)  # merged into q/k/v/o
    from safetensors.torch import load_file
    base = load_file(str(config.resolve("mini").llm_path / "model.safetensors"))
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(model.llm.named_parameters())[k], base[k])
    assert torch.equal(dict(model.llm.named_parameters())["model.layers.0.mlp.up_proj.weight"],
                       base["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
def test_stage2_ddp_two_processes_equal_one_process(stage1_run, tmp_path):
    common = ["--stage", "2", "--stage1", str(stage1_run), "--profile", "mini", "--max-steps", "3",
              "--batch-size", "4", "--eval-every", "0", "--answer-eval-n", "0", "--eval-limit", "8",
              "--no-tensorboard", "--save-every", "0", "--num-workers", "0", "--seed", "5", "--no-progress"]
    run_single_and_ddp(common, tmp_path, 29519)
    from safetensors.torch import load_file
    for name in ("projection.safetensors", "llm/model.safetensors"):
        a = load_file(str(tmp_path / "single" / "final" / name))
        b = load_file(str(tmp_path / "ddp" / "final" / name))
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (name, k, (a[k] - b[k]).abs().max())
