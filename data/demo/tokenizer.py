"""
A tiny byte-level BPE trainer and a Hugging Face tokenizer writer, in plain Python, for the demo's and the tests'
random checkpoints (no `tokenizers` needed at runtime). Import it from the repo root as `data.demo.tokenizer`:

    from data.demo.tokenizer import train_byte_bpe, write_tokenizer, CHAT_TEMPLATES
    tok_json = train_byte_bpe(texts, vocab_size=512)        # 512 BPE ids, then the 5 ChatML specials: 512..516
    write_tokenizer("out/tiny", tok_json, CHAT_TEMPLATES["llava_onevision"])

What it writes is the Qwen2 tokenizer's structure: NFC normalizer, Qwen2's split
regex + ByteLevel pre-tokenizer, BPE without byte fallback, ByteLevel decoder; `tokenizers`, transformers
(Qwen2Tokenizer) and our tokenizer.py load it and agree (tests/test_tokenizer.py).
"""

import collections
import json
import os
import unicodedata

import regex  # a dependency of tiktoken; stdlib `re` has no \p{L} / \p{N} for Qwen2's pre-tokenizer pattern

from tokenizer import bytes_to_unicode  # the top-level tokenizer.py (this module is data.demo.tokenizer)

QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# the ChatML family's added tokens in Qwen2 order (there 151643..151647; here right after the BPE vocab)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# the hub chat templates, verbatim; tokenizer.chat_prompt renders the same
CHAT_TEMPLATES = {
    "llava_onevision": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
        "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llava_next_video": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
        "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
        "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
}


def train_byte_bpe(texts, vocab_size, special_tokens=CHATML_SPECIALS):
    """Byte-level BPE over `texts` -> a tokenizer.json dict. Ids 0..255 are the bytes (id = byte value), then one id
    per merge in merge order (most frequent adjacent pair first, ties to the smaller byte strings; a pair whose
    result already exists is never merged), up to
    `vocab_size` BPE ids in all; the special tokens follow at vocab_size, vocab_size+1, ... Merge order equals id
    order, which is what lets tiktoken (lowest-rank result first) reproduce HF's merge-list BPE exactly."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte tokens a byte-level BPE needs")
    pretokenize = regex.compile(QWEN2_PATTERN)
    split_specials = regex.compile("|".join(map(regex.escape, sorted(special_tokens, key=len, reverse=True))))
    words = collections.Counter()  # pre-token bytes -> count
    for text in texts:
        for segment in (split_specials.split(text) if special_tokens else [text]):
            for piece in pretokenize.findall(unicodedata.normalize("NFC", segment)):
                words[piece.encode("utf-8")] += 1
    pieces = [bytes([b]) for b in range(256)]           # id -> bytes
    seqs = [list(w) for w in words]                     # each word as a list of ids (initially its bytes)
    counts = list(words.values())
    pair_count = collections.Counter()                  # (id, id) -> occurrences weighted by word count
    where = collections.defaultdict(set)                # (id, id) -> indices of words containing it
    for w, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += counts[w]
            where[pair].add(w)
    merges, known, banned = [], set(pieces), set()
    while len(pieces) < vocab_size:
        if not pair_count:
            raise ValueError(f"the corpus ({sum(counts)} pre-tokens) only supports {len(pieces)} BPE ids, fewer "
                             f"than vocab_size={vocab_size}: give more text or a smaller vocab_size")
        best = min(pair_count, key=lambda p: (-pair_count[p], pieces[p[0]], pieces[p[1]]))
        if pieces[best[0]] + pieces[best[1]] in known:  # a second path to an existing piece: never merge it, so
            banned.add(best)                               # that ids stay unique and increase with merge order
            del pair_count[best]
            continue
        new = len(pieces)
        known.add(pieces[best[0]] + pieces[best[1]])
        pieces.append(pieces[best[0]] + pieces[best[1]])
        merges.append(best)
        for w in where.pop(best):
            seq = seqs[w]
            for pair in zip(seq, seq[1:]):             # retract this word's pairs, merge, add them back
                if pair in pair_count:
                    pair_count[pair] -= counts[w]
                    if pair_count[pair] <= 0:
                        del pair_count[pair]
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[w] = merged
            for pair in zip(merged, merged[1:]):
                if pair in banned:
                    continue
                pair_count[pair] += counts[w]
                where[pair].add(w)
    table = bytes_to_unicode()
    text_of = [''.join(table[b] for b in p) for p in pieces]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": vocab_size + k, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for k, t in enumerate(special_tokens)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(text_of)},
                  "merges": [[text_of[a], text_of[b]] for a, b in merges]},
    }


def write_tokenizer(out_dir, tok_json, chat_template=CHAT_TEMPLATES["llava_onevision"]):
    """Write tokenizer.json + tokenizer_config.json (Qwen2Tokenizer, ChatML roles: eos <|im_end|>, pad
    <|endoftext|>, no BOS) so that `tokenizers`, transformers' AutoTokenizer and tokenizer.py all load `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tok_json["added_tokens"]}
    names = {t["content"] for t in tok_json["added_tokens"]}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>" if "<|im_end|>" in names else None,
        "pad_token": "<|endoftext|>" if "<|endoftext|>" in names else None,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "model_max_length": 32768,
        "padding_side": "left",
        "chat_template": chat_template,
    }
    for name, obj in (("tokenizer.json", tok_json), ("tokenizer_config.json", config)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
