"""The "words" router on any model with get_input_embeddings(): every adapted layer routes on the same x̄,
the mean input embedding of the instruction's tokens that its start saw, with routers started by update
k-means (fitted with word dropout) and frozen.

Not the paper's routing (docs/method.md §3): ours, from experiments/routers.py (`InstructionWords`,
`update_kmeans(..., words=True)`), where it routes like the oracle on the conflict cells and loses on new
phrasings (experiments/results/routers/README.md). Torch only: it reads what every transformers model has,

    x̄_n  = mean of get_input_embeddings()(input_ids)_n over the instruction mask (routing_mask's prompt
           mask without the image placeholder tokens), over the words the start saw (`known`) only
    IFS:   p^A = score(R^A x̄),  p^B = score(R^B x̄),  S^A = top-r(p^A),  S^B = top-r(p^B)

R^A and R^B are (E, d_words), d_words the input embedding's width, so every target (down_proj too) reads
the same x̄; no CFS, since it would read the layer's own pool. The start (`update_kmeans_start`) sets
R^A = R^B from what each training instance asks of the model, U_i, and freezes them (buffers).
"""

from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from mixlora import BUILDERS, SCORES, MixLoRALinear, Routing, replace_linears, routing_mask, straight_through


def instruction_mask(input_ids: Tensor, prompt_mask: Tensor, image_token_id: int) -> Tensor:
    """The instruction's positions (N, L) bool: the prompt mask without the image placeholder tokens."""
    return prompt_mask & (input_ids != image_token_id)


def known_words(words: Tensor, input_ids: Tensor, known: Tensor) -> Tensor:
    """The instruction's words (N, L) bool that are known (vocab,) bool; all of them where none is."""
    fitted_on = words & known[input_ids]
    return torch.where(fitted_on.any(1, keepdim=True), fitted_on, words)


def words_x_bar(embedded: Tensor, mask: Tensor) -> Tensor:
    """x̄ = the mean of the input embeddings (N, L, d_words) over mask (N, L) -> (N, d_words), in float32 at
    least (§3.5), detached: routing trains no layer below it. The one place that says what the router pools."""
    dtype = torch.promote_types(embedded.dtype, torch.float32)
    m = mask.to(dtype)
    m = m / m.sum(1, keepdim=True).clamp(min=1)  # an instance with no instruction token routes on x̄ = 0
    return torch.bmm(m[:, None, :], embedded.detach().to(dtype)).squeeze(1)  # (N, 1, L) @ (N, L, d) -> (N, d)


class WordsLinear(MixLoRALinear):
    """MixLoRA whose routers read x̄ = words_x_bar of the instruction's input embeddings, not the layer's input.

    IFS only, frozen routers (buffers, router_grad=False): `update_kmeans_start` sets them. `input_ids` and
    `embedded` (N, L, d_words) are handed over by add_words' hook on the input embedding; the prompt mask is
    routing_mask's, as for every MixLoRA layer, which also makes new tokens reuse the prompt's routing.
    """

    def __init__(self, base: nn.Linear, num_factors: int, rank: int, d_words: int, image_token_id: int,
                 vocab_size: int, alpha: float | None = None, dropout: float = 0.0, scores: str = "softmax",
                 upcast: bool = True):
        super().__init__(base, num_factors, rank, alpha, dropout, conditional=False, router_grad=False,
                         scores=scores, upcast=upcast)
        self.d_words, self.image_token_id = d_words, image_token_id
        for name in ("router_A", "router_B"):  # MixLoRALinear's init, with d_words inputs: R^A, R^B (E, d_words)
            self.register_buffer(name, ((torch.rand(num_factors, d_words) * 2 - 1) / d_words ** 0.5).to(self.lora_A))
        # The words the routers were fitted on (the start sets it; until then every word): a word the start
        # never saw is no evidence for any factor, and a new phrasing's new words would only move x̄ off.
        self.register_buffer("known", torch.ones(vocab_size, dtype=torch.bool, device=self.lora_A.device))
        self.input_ids: Tensor | None = None  # (N, L), set by add_words' hook
        self.embedded: Tensor | None = None  # (N, L, d_words)

    def arguments(self) -> dict:
        """What built this layer: add_words' arguments (save_adapters writes them; load_adapters calls add_words)."""
        return dict(method="words", num_factors=self.num_factors, rank=self.rank, alpha=self.alpha,
                    dropout=self.dropout.p, scores=self.scores, upcast=self.upcast, d_words=self.d_words,
                    image_token_id=self.image_token_id, vocab_size=len(self.known))

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        """S^A = top-r(score(R^A x̄)), S^B = top-r(score(R^B x̄)), x̄ the instruction's mean input embedding."""
        if mask is None:
            raise ValueError("a words layer routes on the prompt: call the model inside "
                             "routing_mask(model, prompt_mask)")
        if self.embedded is None or self.embedded.shape[:2] != mask.shape:
            raise ValueError(f"the prompt mask is {tuple(mask.shape)} but the input embedding last seen is "
                             f"{None if self.embedded is None else tuple(self.embedded.shape[:2])}: call the model "
                             f"with input_ids (the words router reads get_input_embeddings()'s output)")
        with torch.autocast(x.device.type, enabled=False):
            words = known_words(instruction_mask(self.input_ids, mask, self.image_token_id), self.input_ids, self.known)
            x_bar = words_x_bar(self.embedded, words)  # (N, d_words)
            routers = torch.cat([self.router_A, self.router_B]).to(x_bar.dtype)  # (2E, d_words)
            p_a, p_b = SCORES[self.scores]((x_bar @ routers.T).view(-1, 2, self.num_factors)).unbind(1)  # (N, E) each
            index_a, index_b = self.top_r(p_a), self.top_r(p_b)  # (N, r) each
        # No gradient through the routing: the routers are buffers and x̄ is detached, so p^A, p^B have none.
        return Routing(index_a, index_b, straight_through(p_a, index_a), straight_through(p_b, index_b), p_a, p_b)


def add_words(model: nn.Module, targets: Sequence[str] | str, num_factors: int, rank: int, d_words: int, image_token_id: int,
              vocab_size: int, alpha: float | None = None, dropout: float = 0.0, scores: str = "softmax",
              upcast: bool = True) -> nn.Module:
    """Wrap model's target nn.Linear layers in WordsLinear, in place, and register one forward hook on
    model.get_input_embeddings() that hands its input ids and output to them; returns model.

    A call shorter or longer than the prompt mask in force (a decode step, cached or not) hands nothing over:
    new tokens reuse the prompt's routing (MixLoRALinear._routing), and the prompt's embedding stays.
    """
    embedding = model.get_input_embeddings()
    if (embedding.num_embeddings, embedding.embedding_dim) != (vocab_size, d_words):
        raise ValueError(f"vocab_size={vocab_size}, d_words={d_words}, but {type(model).__name__}'s input embeddings "
                         f"are {embedding.num_embeddings} x {embedding.embedding_dim}: adapters of another base model?")
    layers = []

    def make(base: nn.Linear) -> WordsLinear:
        layers.append(WordsLinear(base, num_factors, rank, d_words, image_token_id, vocab_size, alpha, dropout,
                                  scores, upcast))
        return layers[-1]

    def hand_over(module: nn.Module, inputs: tuple, embedded: Tensor) -> None:
        input_ids = inputs[0]  # (N, L)
        for layer in layers:
            if layer.mask is None or input_ids.shape[1] == layer.mask.shape[1]:
                layer.input_ids, layer.embedded = input_ids, embedded.detach()

    replace_linears(model, targets, make)
    embedding.register_forward_hook(hand_over)
    return model


BUILDERS["words"] = add_words  # so that mixlora.load_adapters rebuilds words layers from their saved arguments


# ---- the update k-means start ------------------------------------------------------------------

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
    kept = (torch.rand(copies, *words.shape, generator=gen) >= word_dropout).to(words.device) & words  # (copies, N, L)
    kept |= words & ~kept.any(2, keepdim=True)  # a copy that lost every word keeps them all
    dropped = torch.stack([words_x_bar(embedded, k) for k in kept])  # (copies, N, d_words)
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
    <U_i, U_j> = <g_i, g_j> <v_i − v̄, v_j − v̄>, then `kmeans_routers`."""
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
    R = kmeans_routers(x_bar, gram, layers[0].num_factors, iters, torch.Generator().manual_seed(seed), dropped)
    for layer in layers:
        for router in (layer.router_A, layer.router_B):
            router.copy_(R.to(router))
        layer.known.zero_()[ids.to(layer.known.device)] = True


def kmeans_routers(x_bar: Tensor, gram: Tensor, num_factors: int, iters: int, gen: torch.Generator,
                   dropped: Tensor | None = None) -> Tensor:
    """R (E, d) from the words x̄ (n, d) and the Gram (n, n) of the updates U_i:

      1. U = fitted(x̄, gram): the part of U the words predict (the image averages out);
      2. k-means of U with k = E: factor e is cluster e's, in every layer;
      3. R = ridge(x̄, target)ᵀ, target = −(distance to each centroid)² centred per row and per column, so
         that an instance's top-r are its r nearest clusters, scaled to logits of standard deviation 2;
         fitted on the word-dropout copies `dropped` (copies, n, d) of x̄ where given, each with its
         instance's target.
    """
    if len(x_bar) < num_factors:
        raise ValueError(f"the start clusters instances into E = {num_factors} clusters; it needs at least "
                         f"{num_factors} instances, got {len(x_bar)}")
    U = fitted(x_bar, gram)  # (n, 32)
    target = -torch.cdist(U, k_means(U, num_factors, iters, gen)) ** 2  # (n, E)
    target = target - target.mean(1, keepdim=True)  # only an instance's ranking of the clusters counts
    target = target - target.mean(0)  # no factor favoured on average: a bias-free router has no offset
    X, Y = (x_bar, target) if dropped is None else (dropped.flatten(0, 1), target.repeat(len(dropped), 1))
    R = ridge(X, Y)  # (d, E)
    return (R * 2.0 / (X @ R).std().clamp_min(1e-12)).T


def ridge(X: Tensor, Y: Tensor) -> Tensor:
    """The least-squares map W (d, k) from X (n, d) to Y (n, k), with a little ridge: (XᵀX + λI)⁻¹ XᵀY."""
    XtX = X.T @ X
    return torch.linalg.solve(XtX + 1e-2 * XtX.trace() / len(XtX) * torch.eye(len(XtX), dtype=X.dtype), X.T @ Y)


def fitted(X: Tensor, gram: Tensor, m: int = 32) -> Tensor:
    """Features U (n, ·) given by their Gram matrix (n, n), least-squares fitted on X (n, d): the
    part of U that X predicts, as its top m directions (n, m). Fitting on the instruction's x̄
    averages out what varies within an instruction (the image)."""
    X = X - X.mean(0)
    hat = X @ ridge(X, torch.eye(len(X), dtype=X.dtype))  # (n, n): the fit's hat matrix
    values, vectors = torch.linalg.eigh(hat @ gram @ hat)
    return vectors[:, -m:] * values[-m:].clamp_min(0).sqrt()


def k_means(x: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Lloyd's algorithm from k points drawn at random: (n, d) -> (k, d) centroids."""
    centroids = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        nearest = torch.cdist(x, centroids).argmin(1)  # (n,)
        for j in range(k):
            if (nearest == j).any():
                centroids[j] = x[nearest == j].mean(0)
    return centroids
