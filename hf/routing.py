"""The start of mixlora.py's words router (WordsLinear, add_words: docs/method.md §3.11) on a transformers
model: what each training instance asks of the base model, read from the batches the Trainer sees, then
mixlora's update_targets and fit_routers. Torch only; it reads what every transformers VLM has:
get_input_embeddings(), get_decoder() (the embeddings the LM receives, the image's among them), the
logits and the labels.

    model = add_words(lm, targets, E, r, d_words, image_token_id, vocab_size)   # mixlora.py
    update_kmeans_start(model, batches)                                         # here: R^A = R^B, known; frozen
"""

from typing import Iterable

import torch
import torch.nn as nn
from torch import Tensor

from mixlora import WordsLinear, drop_words, fit_routers, instruction_mask, routing_mask, update_targets, words_x_bar


@torch.no_grad()
def answer_update(model: nn.Module, batch: dict[str, Tensor], image_token_id: int, word_dropout: float = 0.5,
                  copies: int = 16, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What one batch (the Trainer's: input_ids, attention_mask, labels, pixel_values, ...) asks of the base
    model, per instance, in float64 on the CPU:

      x̄_i, the words (N, d_words), and `copies` of it with each word dropped with probability word_dropout
            (copies, N, d_words), what the routers are fitted on;
      g_i = Σ_{t: label_t ≠ -100} (softmax(logits_{t-1}) − e_{y_t}) (N, vocab): the answer loss's gradient
            with respect to the logits;
      v_i, the mean over the image tokens of the embeddings the language model receives (N, d_lm);

    and the instruction's token ids (the words the start sees). g_i ⊗ v_i is then the answer loss's gradient
    with respect to a linear map from v to the logits. The adapters must add nothing yet (lora_B = 0), so
    that this is the base model's.
    """
    prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()  # MixLoRATrainer's prompt mask
    seen = {}

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["inputs_embeds"] = kwargs["inputs_embeds"]  # (N, T, d_lm): the text's and the image's embeddings

    hook = model.get_decoder().register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with routing_mask(model, prompt):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (N, T, vocab)
    finally:
        hook.remove()
    input_ids, labels = batch["input_ids"], batch["labels"]
    words, embedded = instruction_mask(input_ids, prompt, image_token_id), model.get_input_embeddings()(input_ids)
    x_bar = words_x_bar(embedded, words)  # (N, d_words)
    # Word dropout: no single word of a phrasing may decide the routing, so the fit sees every instruction
    # with random words left out (at least one kept).
    dropped = torch.stack([words_x_bar(embedded, k) for k in drop_words(words, copies, word_dropout, gen)])  # (copies, N, d)
    answer = labels[:, 1:] != -100  # (N, T - 1): token t + 1 is an answer token, predicted at t
    p = logits[:, :-1][answer].double().softmax(-1)  # (answer tokens, vocab): only these, a vocab-wide row each
    p[torch.arange(len(p)), labels[:, 1:][answer]] -= 1.0  # softmax − e_y
    rows = answer.nonzero()[:, 0]  # the instance of each answer token
    g = p.new_zeros(len(labels), p.shape[1]).index_add_(0, rows, p)  # (N, vocab): summed per instance
    v = words_x_bar(seen["inputs_embeds"], input_ids == image_token_id)  # (N, d_lm): the mean image token
    return x_bar.double().cpu(), dropped.double().cpu(), g.cpu(), v.double().cpu(), input_ids[words].cpu()


def update_kmeans_start(model: nn.Module, batches: Iterable[dict[str, Tensor]], iters: int = 25, seed: int = 0,
                        word_dropout: float = 0.5, copies: int = 16) -> None:
    """Set every WordsLinear's R^A = R^B and known words from the training batches, as experiments/routers.py's
    update_kmeans(words=True, known=True, word_dropout=0.5) does on the toy, and leave them frozen: per instance
    x̄_i, its word-dropout copies, g_i and v_i (`answer_update`), the Gram of U_i = g_i ⊗ (v_i − v̄),
    <U_i, U_j> = <g_i, g_j> <v_i − v̄, v_j − v̄>, then `update_targets` and `fit_routers`."""
    layers = [m for m in model.modules() if isinstance(m, WordsLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no words layers: add_words puts them in")
    if any(layer.lora_B.any() for layer in layers):
        raise ValueError("fit the start before training: it needs the base model's answers (every lora_B = 0)")
    training = model.training
    model.eval()  # no dropout: the base model's answers
    device, gen = next(model.parameters()).device, torch.Generator().manual_seed(seed)
    parts = [answer_update(model, {k: v.to(device) for k, v in batch.items()}, layers[0].image_token_id,
                           word_dropout, copies, gen) for batch in batches]
    model.train(training)
    x_bar, dropped, g, v, ids = (torch.cat(part, dim=1 if part[0].dim() == 3 else 0) for part in zip(*parts))
    v = v - v.mean(0)  # x̄ (n, d_words), dropped (copies, n, d_words), g (n, vocab), v (n, d_lm), ids (words,)
    gram = (g @ g.T) * (v @ v.T)  # (n, n): <g_i ⊗ v_i, g_j ⊗ v_j> = <g_i, g_j> <v_i, v_j>
    target = update_targets(x_bar, gram, layers[0].num_factors, iters, torch.Generator().manual_seed(seed))  # (n, E)
    R = fit_routers(x_bar, target, dropped)  # (E, d_words)
    for layer in layers:
        for router in (layer.router_A, layer.router_B):
            router.copy_(R.to(router))
        layer.known.zero_()[ids.to(layer.known.device)] = True
