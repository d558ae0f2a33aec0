"""A tiny teacher for the build's smoke mode: a small random Llama over a byte-level tokenizer with a chat template.

Bytes make every text encodable (prompts, local text, the haystack, benchmark questions), so the tiny build runs
every stage of the real one on the same data paths, in a minute on a CPU and with nothing to download.
"""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """256 byte tokens (GPT-2's byte-to-character map, no merges) + <|im_end|> (EOS), <|pad|>, <|im_start|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_teacher(
    vocab: int = 259, hidden: int = 64, layers: int = 4, context: int = 1024, std: float = 0.1, seed: int = 0
):
    """A random Llama (EOS = <|im_end|> = 256, padding 257, tied embeddings), sharper than the default init so
    that its mixers differ measurably."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        eos_token_id=256,
        pad_token_id=257,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name or "embed" in name:
                p.normal_(0, std)
    return model
