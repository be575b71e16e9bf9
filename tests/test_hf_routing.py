"""hf/routing.py, the words router on a Hugging Face VLM, and hf/finetune_vlm.py's --router words, on the
tiny random LLaVA of tests/test_finetune_vlm.py (built from its config, nothing downloaded)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from tests.test_finetune_vlm import llava_dir, one_thread, records, saved_vlm, tiny_llava, tiny_processor  # noqa: E402,F401
from tests.test_finetune_vlm import without_video_processor  # noqa: E402,F401  (saved_vlm's)

from hf import finetune_vlm  # noqa: E402
from hf.routing import answer_update, update_kmeans_start  # noqa: E402
from mixlora import (WordsLinear, add_words, fit_routers, instruction_mask, known_words, update_targets,  # noqa: E402
                     words_x_bar)
from mixlora import adapter_state_dict, mark_only_adapters_trainable, read_adapters, routing_mask  # noqa: E402

F64 = torch.float64
TARGETS = finetune_vlm.TARGETS.split(",")


def words_llava(folder, n: int = 8, E: int = 8, r: int = 2):
    """A float64 tiny LLaVA with words layers on its LM, its processor, and a training batch of n records."""
    processor = tiny_processor()
    model = tiny_llava(processor).double()
    torch.manual_seed(1)
    add_words(finetune_vlm.language_model(model), TARGETS, E, r, d_words=32, image_token_id=model.config.image_token_id,
              vocab_size=model.get_input_embeddings().num_embeddings)
    data = [dict(rec, image=str(folder / rec["image"])) for rec in records(folder, n)]
    batch = finetune_vlm.Collator(processor, train=True)(data)
    batch["pixel_values"] = batch["pixel_values"].double()
    return model, processor, batch


def words_layers(model) -> list[WordsLinear]:
    return [m for m in model.modules() if isinstance(m, WordsLinear)]


def prompt_mask(batch) -> torch.Tensor:
    return (batch["labels"] == -100) & batch["attention_mask"].bool()


def selections(model, batch) -> list[torch.Tensor]:
    """Every words layer's S^A and S^B (N, 2r) on the batch, routed on its prompt."""
    with routing_mask(model, prompt_mask(batch)), torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    return [torch.cat([m.last_routing.index_a, m.last_routing.index_b], 1) for m in words_layers(model)]


def test_x_bar_is_the_mean_embedding_of_the_instruction_tokens_only(tmp_path):
    model, processor, batch = words_llava(tmp_path)
    tok, image = processor.tokenizer, model.config.image_token_id
    chosen = selections(model, batch)
    layers = words_layers(model)
    assert len(layers) == 2 * 7 and all(m.router_A.shape == (8, 32) and m.mask is None for m in layers)
    embedded = model.get_input_embeddings()(batch["input_ids"]).detach()  # (N, T, 32)
    for n in range(len(batch["input_ids"])):  # by hand: the prompt's tokens but the image's
        ids, labels = batch["input_ids"][n].tolist(), batch["labels"][n].tolist()
        keep = [t for t in range(len(ids)) if batch["attention_mask"][n, t] and labels[t] == -100 and ids[t] != image]
        question = ["what colour is the shape ?", "describe it"][n % 2]
        assert tok.decode([ids[t] for t in keep]) == f"<s> USER: {question} ASSISTANT:"  # no image, answer or padding
        x_bar = embedded[n, keep].mean(0)
        torch.testing.assert_close(words_x_bar(layers[0].embedded, instruction_mask(
            batch["input_ids"], prompt_mask(batch), image))[n], x_bar, rtol=0, atol=1e-12)
        for layer, s in zip(layers, chosen):  # every layer: the top-r of its logits (the scores keep their order) on that x̄
            expected = [(layer.router_A @ x_bar).topk(2).indices.sort().values,
                        (layer.router_B @ x_bar).topk(2).indices.sort().values]
            assert torch.equal(s[n], torch.cat(expected))
    # Records 0 and 2 ask the same question of a red and a blue square: the same selections in every layer;
    # records 0 and 1 ask different questions: different ones somewhere.
    assert all(torch.equal(s[0], s[2]) for s in chosen) and any(not torch.equal(s[0], s[1]) for s in chosen)


def test_generation_reuses_the_prompts_routing_and_keeps_its_embedding(tmp_path):
    model, processor, _ = words_llava(tmp_path)
    data = [dict(rec, image=str(tmp_path / rec["image"])) for rec in records(tmp_path, 3)]
    prompts = finetune_vlm.Collator(processor, train=False)(data)  # left-padded
    prompts["pixel_values"] = prompts["pixel_values"].double()
    layers, lengths = words_layers(model), []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    with routing_mask(model, prompts["attention_mask"].bool()), torch.no_grad():
        model.generate(**prompts, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(layers[0].embedded, model.get_input_embeddings()(prompts["input_ids"]))  # the prompt's
    hook.remove()
    T = prompts["input_ids"].shape[1]
    assert lengths == [T, 1, 1, 1, T]  # the prefill, 3 cached decode steps (then the check's own call)
    x_bar = words_x_bar(layers[0].embedded, instruction_mask(prompts["input_ids"], prompts["attention_mask"].bool(),
                                                             model.config.image_token_id))
    assert torch.equal(layers[0].last_routing.index_a, (x_bar @ layers[0].router_A.T).topk(2).indices.sort().values)


def test_answer_update_is_the_gradient_of_a_linear_image_to_logits_map(tmp_path):
    """g_i ⊗ v_i, written out: ∂/∂M of instance i's summed answer loss with logits + M v_i, at M = 0, where v_i
    is the mean of the projector's image features (what the LM receives at the image tokens)."""
    model, _, batch = words_llava(tmp_path, n=4)
    x_bar, _, g, v, _ = answer_update(model, batch, model.config.image_token_id)
    with routing_mask(model, prompt_mask(batch)), torch.no_grad():
        logits = model(**{k: t for k, t in batch.items() if k != "labels"}).logits  # (N, T, vocab)
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
    v_ref = torch.stack(list(features)).mean(1)  # (N, 32): 4 patch features per image
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [4] * 4
    labels = batch["labels"]
    for i in range(len(labels)):
        M = torch.zeros(logits.shape[-1], 32, dtype=F64, requires_grad=True)
        z = logits[i, :-1] + M @ v_ref[i]  # (T - 1, vocab)
        ce = torch.nn.functional.cross_entropy(z, labels[i, 1:].clamp(min=0), reduction="none")
        (ce * (labels[i, 1:] != -100)).sum().backward()
        torch.testing.assert_close(torch.outer(g[i], v[i]), M.grad, rtol=1e-9, atol=1e-12)
    assert x_bar.shape == (4, 32) and g.abs().sum() > 0


def kmeans_routers(x_bar, gram, E, iters, gen, dropped=None):
    return fit_routers(x_bar, update_targets(x_bar, gram, E, iters, gen), dropped)


def test_kmeans_routers_give_each_factor_to_one_task_whatever_the_phrasing():
    # 4 tasks, 3 phrasings each: x̄ is the phrasing's embedding (all 12 differ); the update U_i is the
    # task's plus image noise twice its size. With E = 8 clusters, each factor's instances (those whose
    # top-1 it is) are of one task: the clusters are the update's, not the phrasing's.
    gen = torch.Generator().manual_seed(0)
    phrasing = torch.arange(480) % 12
    task = phrasing % 4
    x_bar = torch.randn(12, 24, dtype=F64, generator=gen)[phrasing] + 0.05 * torch.randn(480, 24, dtype=F64, generator=gen)
    U = torch.randn(4, 40, dtype=F64, generator=gen)[task] + 2 * torch.randn(480, 40, dtype=F64, generator=gen)
    R = kmeans_routers(x_bar, U @ U.T, 8, 25, torch.Generator().manual_seed(0))  # (E, d)
    logits = x_bar @ R.T  # (n, E)
    top = logits.argmax(1)
    assert R.shape == (8, 24) and logits.std().item() == pytest.approx(2.0)
    assert all(task[top == e].unique().numel() <= 1 for e in range(8)) and top.unique().numel() >= 4
    # Clustering the phrasing instead (its Gram as the update's) mixes the tasks in some factor.
    top = (x_bar @ kmeans_routers(x_bar, x_bar @ x_bar.T, 8, 25, torch.Generator().manual_seed(0)).T).argmax(1)
    assert any(task[top == e].unique().numel() > 1 for e in range(8))
    with pytest.raises(ValueError, match="at least 16 instances, got 12"):
        kmeans_routers(x_bar[:12], (U @ U.T)[:12, :12], 16, 25, gen)


def test_the_routers_are_fitted_on_the_word_dropout_copies_and_read_only_known_words(tmp_path):
    # Written out: R is the ridge fit of every copy's x̄ to its instance's target, scaled to logits of std 2.
    gen = torch.Generator().manual_seed(0)
    x_bar, U = torch.randn(40, 6, dtype=F64, generator=gen), torch.randn(40, 5, dtype=F64, generator=gen)
    dropped = x_bar + 0.3 * torch.randn(3, 40, 6, dtype=F64, generator=gen)
    R = kmeans_routers(x_bar, U @ U.T, 4, 25, torch.Generator().manual_seed(1), dropped)
    from mixlora import fitted, k_means
    V = fitted(x_bar, U @ U.T)
    target = -torch.cdist(V, k_means(V, 4, 25, torch.Generator().manual_seed(1))) ** 2
    target = target - target.mean(1, keepdim=True) - (target - target.mean(1, keepdim=True)).mean(0)
    X = dropped.flatten(0, 1)
    W = torch.linalg.solve(X.T @ X + 1e-2 * (X.T @ X).trace() / 6 * torch.eye(6, dtype=F64), X.T @ target.repeat(3, 1))
    torch.testing.assert_close(R, (W * 2.0 / (X @ W).std()).T, rtol=1e-9, atol=1e-12)
    # The start: known = the instruction words of its batches; a word it never saw moves no selection.
    model, processor, batch = words_llava(tmp_path)
    update_kmeans_start(model, [batch])
    layer, tok = words_layers(model)[0], processor.tokenizer
    words = instruction_mask(batch["input_ids"], prompt_mask(batch), model.config.image_token_id)
    assert torch.equal(layer.known.nonzero()[:, 0], batch["input_ids"][words].unique())
    unseen = next(i for i in range(len(layer.known)) if not layer.known[i] and i != model.config.image_token_id)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    first_word = words.float().argmax(1)  # each instruction's first word, replaced by an unseen one ...
    other["input_ids"][torch.arange(len(words)), first_word] = unseen
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    # ... routes as the instruction without it (the known words' mean), which a plain mean would not
    x = words_x_bar(layer.embedded, words)
    selections(model, other)  # (hands other's embedding to the layers)
    without = words.clone()
    without[torch.arange(len(words)), first_word] = False
    torch.testing.assert_close(words_x_bar(layer.embedded, known_words(words, other["input_ids"], layer.known)),
                               words_x_bar(layer.embedded, without), rtol=0, atol=0)
    assert not torch.allclose(words_x_bar(layer.embedded, words), x)


def test_the_start_is_frozen_and_an_optimizer_step_changes_no_selection(tmp_path):
    model, _, batch = words_llava(tmp_path)
    layers = words_layers(model)
    init = layers[0].router_A.clone()
    update_kmeans_start(model, [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}])
    assert not torch.equal(layers[0].router_A, init)
    assert all(torch.equal(m.router_A, layers[0].router_A) and torch.equal(m.router_B, m.router_A) for m in layers)
    mark_only_adapters_trainable(model).train()
    assert not any(".router_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert any(k.endswith(".router_A") for k in adapter_state_dict(model))  # saved as buffers
    before, routers = selections(model.train(), batch), [m.router_A.clone() for m in layers]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with routing_mask(model, prompt_mask(batch)):
        model(**batch).loss.backward()
    assert all(m.lora_B.grad.abs().sum() > 0 for m in layers)
    opt.step()
    assert all(m.lora_B.abs().sum() > 0 for m in layers)  # the step moved the factors ...
    assert all(torch.equal(m.router_A, r) for m, r in zip(layers, routers))  # ... not the routers
    assert all(torch.equal(a, b) for a, b in zip(before, selections(model, batch)))
    with pytest.raises(ValueError, match="before training"):
        update_kmeans_start(model, [batch])


def test_router_words_trains_saves_loads_and_answers_as_the_trained_model(llava_dir, tmp_path):
    out = tmp_path / "run"
    data = ["--model", str(llava_dir / "model"), "--data", str(llava_dir / "train.json"), "--device", "cpu"]
    model = finetune_vlm.main(data + ["--out", str(out), "--router", "words", "--factors", "8", "--rank", "2",
                                      "--start-records", "8", "--steps", "60", "--batch-size", "4", "--lr", "1e-2",
                                      "--dropout", "0"])
    run, (config, tensors) = json.loads((out / "run.json").read_text()), read_adapters(out)
    assert (run["router"], run["start_records"], run["method"]) == ("words", 8, "mixlora")
    [group] = config["adapters"]
    assert {k: v for k, v in group.items() if k != "modules"} == dict(
        method="words", num_factors=8, rank=2, alpha=16.0, dropout=0.0, scores="softmax", upcast=True, d_words=32,
        image_token_id=model.config.image_token_id, vocab_size=model.get_input_embeddings().num_embeddings)
    assert len(group["modules"]) == 2 * 7 and len(words_layers(model)) == 2 * 7
    assert tensors.keys() == adapter_state_dict(model).keys()
    assert all(torch.equal(tensors[k], v) for k, v in adapter_state_dict(model).items())
    answers = finetune_vlm.main(["--generate", str(llava_dir / "train.json"), "--out", str(out), "--device", "cpu",
                                 "--batch-size", "3", "--max-new-tokens", "5"])
    # The trained model in memory, one prompt at a time, without padding or KV cache, answers the same.
    processor = finetune_vlm.AutoProcessor.from_pretrained(llava_dir / "model")
    collate, model = finetune_vlm.Collator(processor, train=False), model.eval()
    for record, answer in zip(finetune_vlm.load_records(str(llava_dir / "train.json"), None, answers=False), answers):
        batch = collate([record])
        with routing_mask(model, batch["attention_mask"].bool()), torch.no_grad():
            new = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False,
                                 suppress_tokens=[model.config.image_token_id])
        assert processor.tokenizer.decode(new[0, batch["input_ids"].shape[1]:], skip_special_tokens=True) == answer["answer"]
    truth = [r["conversations"][1]["value"] for r in json.loads((llava_dir / "train.json").read_text())]
    assert [a["answer"] for a in answers] == truth


def generate_error(llava_dir, out, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        finetune_vlm.main(["--generate", str(llava_dir / "train.json"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "".join(err) and err[-1].startswith("error: ")
    return err[-1]


def test_router_words_refuses_lora_too_few_records_and_adapters_of_another_model(llava_dir, tmp_path, capsys):
    data = ["--model", str(llava_dir / "model"), "--data", str(llava_dir / "train.json"), "--device", "cpu",
            "--out", str(tmp_path / "run"), "--router", "words"]
    for flags, says in [(["--method", "lora"], "argument --router: words routes MixLoRA's factors"),
                        (["--factors", "8", "--start-records", "4"], "argument --start-records: the start clusters "
                                                                     "records into E = 8 clusters")]:
        with pytest.raises(SystemExit) as exit_info:
            finetune_vlm.main(data + flags)
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
    # Adapters saved for another image token id, or for input embeddings of another width: one line each.
    out = tmp_path / "saved"
    processor = tiny_processor()
    model = tiny_llava(processor)
    config = dict(model=str(llava_dir / "model"), method="mixlora", router="words", factors=4, rank=2, alpha=8.0,
                  dropout=0.0, scores="softmax", targets=["q_proj"], bf16=False)
    finetune_vlm.add_adapters(model, config)
    finetune_vlm.save(model, config, out)
    written = json.loads((out / "adapter_config.json").read_text())
    for key, value, says in [("image_token_id", 0, "trained with image token id 0, but this LlavaForConditional"
                                                   "Generation's is 4: another base model?"),
                             ("d_words", 64, "d_words=64, but LlavaForConditionalGeneration's input embeddings "
                                             "are 26 x 32")]:
        (out / "adapter_config.json").write_text(json.dumps(dict(written, adapters=[dict(written["adapters"][0], **{key: value})])))
        assert says in generate_error(llava_dir, out, capsys)
