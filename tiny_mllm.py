"""A tiny LLaVA-shaped vision-language model that MixLoRA plugs into.

    image -> VisionEncoder (patches + transformer) -> projector -> image tokens ┐
    text  -> embedding ---------------------------------------------------------┴-> [image; text]
          -> decoder-only LM (pre-norm blocks: causal self-attention, MLP) -> next-token logits

As in LLaVA, the image tokens come first and the LM reads them like words. The LM's linear
layers are named q_proj, k_proj, v_proj, o_proj, up_proj and down_proj, so that
add_mixlora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], ...)
adapts every linear layer of the LM and none of the vision tower, as the paper does.

The model hands its prompt mask (image + instruction positions) to the adapters with
routing_mask, so MixLoRA routes on the prompt alone: teacher-forced training and greedy
generation choose the same factors.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mixlora import routing_mask


class Tokenizer:
    """Word-level: lower-cased words and punctuation marks are the tokens."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, words: list[str]):
        self.itos = ["<pad>", "<eos>", "<unk>"] + sorted(set(words))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.UNK) for w in re.findall(r"\w+|[^\w\s]", text.lower())]

    def decode(self, ids: list[int]) -> str:
        words = []
        for i in ids:
            if i in (self.EOS, self.PAD):
                break
            words.append(self.itos[i])
        return " ".join(words)


@dataclass
class TinyMLLMConfig:
    vocab_size: int
    image_size: int = 32
    patch_size: int = 8
    vision_dim: int = 128
    vision_layers: int = 2
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_text_len: int = 32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEncoder(nn.Module):
    """A small ViT: non-overlapping patches, learned positions, pre-norm transformer blocks."""

    def __init__(self, c: TinyMLLMConfig):
        super().__init__()
        self.patch_embed = nn.Sequential(  # a small convolutional stem sees edges before patches
            nn.Conv2d(3, c.vision_dim // 2, 3, stride=2, padding=1), nn.GELU(),  # (N, C/2, H/2, W/2)
            nn.Conv2d(c.vision_dim // 2, c.vision_dim, c.patch_size // 2, stride=c.patch_size // 2))  # (N, C, H/p, W/p)
        self.pos = nn.Parameter(torch.randn(1, c.num_patches, c.vision_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(c.vision_dim, c.n_heads, 4 * c.vision_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.vision_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.vision_dim)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, P, vision_dim)
        return self.norm(self.blocks(x + self.pos))


class Attention(nn.Module):
    def __init__(self, c: TinyMLLMConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x: Tensor, cache: "KVCache | None" = None) -> Tensor:
        """Causal self-attention over x; with a filled cache, x is one new token after the cached ones."""
        N, S, D = x.shape
        q, k, v = (proj(x).view(N, S, self.n_heads, -1).transpose(1, 2)  # (N, heads, S, D / heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is None or cache.k is None:  # training, or the prefill: x is the whole sequence
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a decode step: the new token reads the prompt (not its padding) and every token since
            k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)  # (N, heads, S_cache + 1, D / heads)
            readable = F.pad(cache.prompt, (0, k.shape[2] - cache.prompt.shape[1]), value=True)  # (N, S_cache + 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=readable[:, None, None, :])
        if cache is not None:
            cache.k, cache.v = k, v
        return self.o_proj(y.transpose(1, 2).reshape(N, S, D))


class KVCache:
    """One attention layer's keys and values at every position so far, (N, heads, S, D / heads),
    for generation; prompt (N, P + L) is True where the prompt has a token, False at its padding."""

    def __init__(self, prompt: Tensor):
        self.prompt = prompt
        self.k: Tensor | None = None
        self.v: Tensor | None = None


class MLP(nn.Module):
    def __init__(self, c: TinyMLLMConfig):
        super().__init__()
        self.up_proj = nn.Linear(c.d_model, 4 * c.d_model, bias=False)
        self.down_proj = nn.Linear(4 * c.d_model, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, c: TinyMLLMConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(c.d_model), Attention(c)
        self.norm2, self.mlp = nn.LayerNorm(c.d_model), MLP(c)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


def answer_mask(tokens: Tensor, prompt_lens: Tensor) -> Tensor:
    """(N, L - 1) bool: which next-token targets the loss counts. Position t predicts token
    t + 1; only answer tokens (and their EOS) count, not the instruction or the padding."""
    text_pos = torch.arange(1, tokens.shape[1], device=tokens.device)
    return (text_pos >= prompt_lens[:, None]) & (tokens[:, 1:] != Tokenizer.PAD)


def answer_losses(logits: Tensor, tokens: Tensor, prompt_lens: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy at every text position (N, L - 1), and answer_mask."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")
    return ce, answer_mask(tokens, prompt_lens)


class TinyMLLM(nn.Module):
    def __init__(self, c: TinyMLLMConfig):
        super().__init__()
        self.config = c
        self.vision = VisionEncoder(c)
        self.projector = nn.Linear(c.vision_dim, c.d_model)  # LLaVA v1's linear projector
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Parameter(torch.randn(1, c.num_patches + c.max_text_len, c.d_model) * 0.02)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # also the (tied) output layer

    def encode_images(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> image tokens (N, P, d_model)."""
        return self.projector(self.vision(images * 2 - 1))

    def decode(self, image_tokens: Tensor, tokens: Tensor, prompt_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at the text positions (N, L, vocab) and the loss on the answer tokens.

        tokens (N, L): instruction, then answer and EOS, then PAD. prompt_lens (N,): how many
        tokens of each row are instruction. Routing sees the image and the instruction only.
        """
        P = image_tokens.shape[1]
        x = self.sequence(image_tokens, tokens)  # (N, P + L, D)
        with routing_mask(self, self.prompt_mask(P, tokens.shape[1], prompt_lens)):
            for layer in self.layers:
                x = layer(x)
        logits = self.norm(x[:, P:]) @ self.embed.weight.T  # (N, L, vocab)
        ce, is_answer = answer_losses(logits, tokens, prompt_lens)  # (N, L - 1) each
        return logits, (ce * is_answer).sum() / is_answer.sum().clamp(min=1)  # no host sync

    def forward(self, images: Tensor, tokens: Tensor, prompt_lens: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode(self.encode_images(images), tokens, prompt_lens)

    def sequence(self, image_tokens: Tensor, tokens: Tensor) -> Tensor:
        """The LM's input: image tokens, then the embedded text, plus positions: (N, P + L, D)."""
        P, L = image_tokens.shape[1], tokens.shape[1]
        if L > self.config.max_text_len:
            raise ValueError(f"text of {L} tokens is longer than max_text_len={self.config.max_text_len}")
        return torch.cat([image_tokens, self.embed(tokens)], dim=1) + self.pos[:, :P + L]

    @staticmethod
    def prompt_mask(P: int, L: int, prompt_lens: Tensor) -> Tensor:
        """(N, P + L) bool: True at the image tokens and each row's instruction tokens."""
        text = torch.arange(L, device=prompt_lens.device) < prompt_lens[:, None]  # (N, L)
        return torch.cat([text.new_ones(len(prompt_lens), P), text], dim=1)

    @torch.no_grad()
    def generate(self, images: Tensor, prompts: Tensor, prompt_lens: Tensor, max_new_tokens: int = 4,
                 use_cache: bool = True) -> Tensor:
        """Greedy answers (N, max_new_tokens), EOS then PAD after each answer's end.

        With the KV cache: one prefill over image + prompt, then one new token per row and step.
        Inside routing_mask(self, prompt) the prefill routes every MixLoRA layer on the prompt and
        every later step, being of another length, reuses that routing (mixlora's rule), so each
        token comes out as under teacher forcing. use_cache=False re-reads the whole sequence at
        every step (quadratic in the answer's length): the reference the tests compare with.
        """
        if prompts.shape[1] + max_new_tokens > self.config.max_text_len:
            raise ValueError(f"{prompts.shape[1]} prompt + {max_new_tokens} new tokens is longer than "
                             f"max_text_len={self.config.max_text_len}")
        image_tokens = self.encode_images(images)
        (N, P), L = image_tokens.shape[:2], prompts.shape[1]
        rows = torch.arange(N, device=prompts.device)
        tokens = F.pad(prompts, (0, max_new_tokens), value=Tokenizer.PAD)  # answers are written in place
        prompt = self.prompt_mask(P, L, prompt_lens)  # (N, P + L)
        caches = [KVCache(prompt) for _ in self.layers] if use_cache else [None] * len(self.layers)
        done = torch.zeros(N, dtype=torch.bool, device=prompts.device)
        with routing_mask(self, prompt):
            for step in range(max_new_tokens):
                at = prompt_lens - 1 + step  # (N,) each row's last token so far
                one_token = use_cache and step > 0
                if one_token:  # just each row's newest token, at its own position
                    x = self.embed(tokens[rows, at])[:, None] + self.pos[0, P + at][:, None]  # (N, 1, D)
                else:  # the whole sequence so far; with a cache, the prefill
                    x = self.sequence(image_tokens, tokens[:, :L + step])  # (N, P + L + step, D)
                for layer, cache in zip(self.layers, caches):
                    x = layer(x, cache)
                last = x[:, 0] if one_token else x[rows, P + at]  # (N, D)
                next_token = (self.norm(last) @ self.embed.weight.T).argmax(-1).masked_fill(done, Tokenizer.PAD)
                tokens[rows, at + 1] = next_token
                done |= next_token == Tokenizer.EOS
        return tokens[rows[:, None], prompt_lens[:, None] + torch.arange(max_new_tokens, device=prompts.device)]
