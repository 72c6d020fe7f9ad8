"""The model core against independent references: naive loss, no-cache decoding, HF hidden states."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_lib import process
from llava_lib.chat import ChatSession
from llava_lib.model.checkpoint import CheckpointMismatchError, load_projection, save_projection

from conftest import tiny_llava


def _batch(tok, model, captions, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [{"pixel_values": torch.randn(3, 224, 224, generator=g), "caption": c} for c in captions]
    return process.collate(tok, samples, model.num_image_tokens, max_text_tokens=64)


def naive_loss(model, batch):
    """Textbook: concatenate [text before | projected image | text after] per sample, full-vocab logits, HF loss."""
    feats = model.projector(model.vision(batch["pixel_values"]))
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b]
        pos = (ids == process.IMAGE_PAD_ID).nonzero().flatten()
        first, last = int(pos[0]), int(pos[-1])
        emb = model.llm.get_input_embeddings()
        rows.append(torch.cat([emb(ids[:first]), feats[b], emb(ids[last + 1:])]))
    embeds = torch.stack(rows)
    return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def test_lean_loss_and_gradients_equal_naive_reference(qwen_tokenizer, tiny_model):
    batch = _batch(qwen_tokenizer, tiny_model, ["图中有一个物体：中间是一个红色的圆形。",
                                                "图中有两个物体：左上方是一个蓝色的三角形，右下方是一个黄色的星形。"])
    lean = tiny_model(**batch).loss
    g_lean = torch.autograd.grad(lean, list(tiny_model.projector.parameters()))
    ref = naive_loss(tiny_model, batch)
    g_ref = torch.autograd.grad(ref, list(tiny_model.projector.parameters()))
    assert abs(float(lean) - float(ref)) < 1e-5
    for a, b in zip(g_lean, g_ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    # The labels are exactly the caption tokens plus <|im_end|> (the loss counts them all).
    assert tiny_model(**batch).n_label_tokens == int((batch["labels"][:, 1:] != -100).sum())


def test_only_projection_trains_and_towers_stay_bit_identical(qwen_tokenizer, tiny_model):
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("projector.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if not p.requires_grad}
    proj_before = [p.detach().clone() for p in tiny_model.projector.parameters()]
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    tiny_model.train()
    assert not tiny_model.vision.training and not tiny_model.llm.training
    tiny_model(**_batch(qwen_tokenizer, tiny_model, ["图中有一个物体：中间是一个红色的圆形。"])).loss.backward()
    opt.step()
    for n, p in tiny_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(proj_before, tiny_model.projector.parameters()))


def test_image_block_is_197_pads_and_absent_without_image(qwen_tokenizer, tiny_model):
    assert process.num_image_tokens(224, 16) == 197 == tiny_model.num_image_tokens
    ids, labels = process.encode_conversation(qwen_tokenizer, process.caption_conversation("一个红色的圆形。"), 197)
    assert ids.count(process.IMAGE_PAD_ID) == 197
    start = ids.index(151652)
    assert ids[start + 1:start + 198] == [process.IMAGE_PAD_ID] * 197 and ids[start + 198] == 151653
    # Labels: exactly the answer + <|im_end|>.
    learned = [t for t, l in zip(ids, labels) if l != -100]
    assert qwen_tokenizer.decode(learned) == "一个红色的圆形。<|im_end|>"
    text_only, _ = process.encode_conversation(qwen_tokenizer, [{"role": "user", "content": "你好"},
                                                                {"role": "assistant", "content": "你好！"}], 197)
    assert process.IMAGE_PAD_ID not in text_only and 151652 not in text_only


def test_text_only_conversation_has_loss_without_image(qwen_tokenizer, tiny_model):
    batch = process.collate(qwen_tokenizer, [{"pixel_values": None, "messages": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}], 197)
    assert batch["pixel_values"] is None
    out = tiny_model(**batch)
    ref = tiny_model.llm(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert abs(float(out.loss) - float(ref)) < 1e-5


def test_feature_layer_matches_transformers_hidden_states(qwen_tokenizer):
    m_last = tiny_llava(qwen_tokenizer, feature_layer=-1)
    x = torch.randn(2, 3, 224, 224)
    ref = m_last.vision.vision_model(pixel_values=x, output_hidden_states=True)
    assert torch.allclose(m_last.vision(x), ref.last_hidden_state, atol=1e-6)
    m_first = tiny_llava(qwen_tokenizer, feature_layer=1)
    assert torch.allclose(m_first.vision(x), ref.hidden_states[1], atol=1e-6)
    assert m_last.vision(x).shape == (2, 197, 32)
    with pytest.raises(ValueError, match="feature_layer"):
        tiny_llava(qwen_tokenizer, feature_layer=5)


def test_mlp_projector_option(qwen_tokenizer):
    m = tiny_llava(qwen_tokenizer, projector_type="mlp2x_gelu")
    n = sum(p.numel() for p in m.projector.parameters())
    assert n == 32 * 32 + 32 + 32 * 32 + 32
    assert torch.isfinite(m(**_batch(qwen_tokenizer, m, ["一个红色的圆形。"])).loss)


def test_mismatched_placeholders_are_a_clear_error(qwen_tokenizer, tiny_model):
    batch = _batch(qwen_tokenizer, tiny_model, ["一个红色的圆形。"])
    with pytest.raises(ValueError, match="占位符"):
        tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                   pixel_values=None)


def _no_cache_greedy(llm, embeds, n, stop):
    """Reference decoding: re-run the whole sequence every step, no KV cache."""
    out = []
    seq = embeds
    for _ in range(n):
        tok = int(llm(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax())
        if tok in stop:
            break
        out.append(tok)
        seq = torch.cat([seq, llm.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
    return out


GREEDY = {"do_sample": False}


def test_greedy_chat_equals_no_cache_loop(qwen_tokenizer, tiny_model):
    """The chat path (generate with its KV cache, streamed) against a full re-run of the sequence every step."""
    session = ChatSession(tiny_model, qwen_tokenizer, image=Image.new("RGB", (300, 200), (200, 30, 30)),
                          generation={**GREEDY, "max_new_tokens": 12})
    ids = torch.tensor([session.prompt_ids("请描述这张图片。")])
    with torch.no_grad():
        embeds = tiny_model.embed(ids, session._pixels)
        ref = _no_cache_greedy(tiny_model.llm, embeds, 12, {151645, 151643})
    reply = session.ask("请描述这张图片。")
    assert len(ref) > 0 and reply == qwen_tokenizer.decode(ref, skip_special_tokens=True)
    assert session.finish_reason == ("length" if len(ref) == 12 else "eos")


def test_stream_concatenates_to_reply_and_history_keeps_one_image(qwen_tokenizer, tiny_model):
    image = Image.new("RGB", (224, 224), (30, 30, 200))
    s1 = ChatSession(tiny_model, qwen_tokenizer, image=image, generation={**GREEDY, "max_new_tokens": 10})
    pieces = list(s1.stream("请描述这张图片。"))
    s2 = ChatSession(tiny_model, qwen_tokenizer, image=image, generation={**GREEDY, "max_new_tokens": 10})
    assert "".join(pieces) == s2.ask("请描述这张图片。")
    s1.ask("左上方是什么？")
    ids = s1.prompt_ids("还有别的吗？")
    assert ids.count(process.IMAGE_PAD_ID) == 197 and ids.count(151652) == 1
    assert len(s1.history) == 4
    s1.clear()
    assert s1.history == [] and s1.image is not None


def test_sampling_is_seeded_and_respects_top_k(qwen_tokenizer, tiny_model):
    sampled = [ChatSession(tiny_model, qwen_tokenizer, generation={"max_new_tokens": 8, "temperature": 5.0},
                           seed=s).ask("你好") for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]  # temperature 5 over 151,936 tokens: two seeds part at once
    top1 = ChatSession(tiny_model, qwen_tokenizer, generation={"max_new_tokens": 8, "top_k": 1}, seed=3).ask("你好")
    greedy = ChatSession(tiny_model, qwen_tokenizer, generation={**GREEDY, "max_new_tokens": 8}).ask("你好")
    assert top1 == greedy  # top_k=1 sampling is greedy


def test_projection_checkpoint_round_trip_and_mismatch(qwen_tokenizer, tiny_model, tmp_path):
    with torch.no_grad():
        for p in tiny_model.projector.parameters():
            p.normal_()
    save_projection(tmp_path / "ck", tiny_model)
    other = tiny_llava(qwen_tokenizer, seed=1)
    meta = load_projection(tmp_path / "ck", other)
    assert meta["projector_type"] == "linear" and meta["num_image_tokens"] == 197
    for a, b in zip(tiny_model.projector.parameters(), other.projector.parameters()):
        assert torch.equal(a, b)
    mlp = tiny_llava(qwen_tokenizer, projector_type="mlp2x_gelu")
    with pytest.raises(CheckpointMismatchError, match="projector_type"):
        load_projection(tmp_path / "ck", mlp)
    with pytest.raises(FileNotFoundError, match="projection.safetensors"):
        load_projection(tmp_path / "missing", other)


def test_zero_rows_head_loss_is_the_full_vocabulary_loss():
    """The mini LM's head: a few live rows, the rest exactly zero. The cheap loss equals the full 151,936-way one
    (value and gradient), also for labels that fall on zero rows; a dense or trainable head keeps the general loss."""
    from llava_lib.mini.loss import zero_rows_head_loss
    from llava_lib.model.llava import lean_causal_lm_loss
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 151936, bias=False).requires_grad_(False)
    live = torch.randperm(151936)[:120]
    with torch.no_grad():
        head.weight.mul_(0)
        head.weight[live] = torch.randn(120, 16) * 3
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    labels = live[torch.randint(0, 120, (2, 30))]
    labels[0, 5] = 7 if 7 not in live else 8  # a zero row's token: its logit is exactly 0
    labels[:, :10] = -100
    fast = zero_rows_head_loss(head)
    assert fast is not lean_causal_lm_loss
    results = []
    for fn in (lean_causal_lm_loss, fast):
        out = fn(head, hidden, labels)
        (grad,) = torch.autograd.grad(out.loss, hidden)
        results.append((float(out.loss), out.n_label_tokens, grad))
    (la, na, ga), (lb, nb, gb) = results
    assert na == nb == int((labels[:, 1:] != -100).sum())
    assert abs(la - lb) <= 1e-5 * abs(la)
    # float32 rounding of the 151,936-way sum in the general loss: ~1e-4 of the largest gradient
    assert torch.allclose(ga, gb, rtol=1e-4, atol=5e-4 * float(ga.abs().max()))
    assert zero_rows_head_loss(torch.nn.Linear(16, 1000, bias=False).requires_grad_(False)) is lean_causal_lm_loss  # dense
    assert zero_rows_head_loss(head.requires_grad_(True)) is lean_causal_lm_loss  # a head that trains may not stay zero
