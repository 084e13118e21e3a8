"""
Tokenizer for the video LLM families: a tiktoken `Encoding` built from a checkpoint's byte-level BPE `tokenizer.json`,
plus each family's chat prompt rendered in plain Python.

    tok = Tokenizer.from_pretrained("path/to/llava-onevision-qwen2-0.5b-ov-hf")
    text = chat_prompt("llava_onevision", [{"role": "user", "content": [{"type": "video"},
                                                                       {"type": "text", "text": "What happens?"}]}])
    ids = tok.encode_prompt(text, num_video_tokens=model.num_video_tokens(8))

Why this is exact (checked by tests/test_tokenizer.py against `tokenizers`):
- a byte-level BPE vocab maps each byte to a printable character (GPT-2's bytes_to_unicode); undoing that map turns
  every vocab string into its bytes, and tiktoken's rank of those bytes is simply the token id;
- tiktoken merges the adjacent pair whose *result* has the lowest rank, HF the pair whose *merge* comes first in
  `merges`; the two agree when result ids increase with merge order, which `_byte_level_ranks` asserts on the file;
- HF matches added tokens (`normalized=false`) on the raw text and normalizes only what lies between them, so we split
  on the added tokens first and apply NFC per segment (NFC over the whole string breaks `<image>` + U+0338).

The Llama/Vicuna tokenizer of llava_next_video ("▁" for space, byte fallback to <0xNN>, BOS `<s>`) is not byte-level:
tiktoken's lowest-rank-result rule cannot rebuild "▁" from bytes and confuses <0x61> with "a", so `LlamaBPE`
implements `tokenizers`' merge rule directly (lowest merge index, leftmost first) and is exact by construction, for
both layouts of that tokenizer: the current one (Metaspace pre-tokenizer) and the legacy one of older Llama-2/Vicuna
files (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer); tests/test_tokenizer_llama.py checks both
against `tokenizers`, and the current one against transformers' LlamaTokenizer.
"""

import heapq
import json
import os
import re
import unicodedata

import tiktoken

# GPT-2's pre-tokenizer pattern: what a bare `ByteLevel(use_regex=true)` pre-tokenizer splits with.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

FAMILIES = ("llava_onevision", "llava_next_video", "qwen2_5_vl", "qwen3_vl")
# Qwen3-VL's clock on the fixed-size frames path: frame i of the F sampled frames at i / 2 s, the clock under which
# Qwen2.5-VL's fixed-size path puts its frame pairs 1 s apart (model.mrope_positions' default second_per_grid_ts).
# The prompt is built before the video is decoded, so it cannot hold the clip's own frame times.
QWEN3_FRAMES_FPS = 2.0


def bytes_to_unicode():
    """GPT-2's byte -> printable-character table: bytes 33-126, 161-172 and 174-255 map to themselves, the other 68
    bytes (controls, space, 127-160, 173) to code points 256, 257, ... in increasing byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# -----------------------------------------------------------------------------
# tokenizer.json -> tiktoken

def _fail(path, what):
    raise ValueError(f"{path}: {what}; supported are byte-level BPE (Qwen2/GPT-2 style) and SentencePiece-style BPE "
                     "with byte fallback (Llama/Vicuna: Metaspace, <0xNN> tokens)")


def _pattern(path, pre):
    """The tiktoken `pat_str` equivalent to a byte-level pre-tokenizer: Qwen2's Sequence[Split(regex), ByteLevel]
    or GPT-2's bare ByteLevel(use_regex=true)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    splits = [p for p in steps if p.get("type") == "Split"]
    bytelevel = [p for p in steps if p.get("type") == "ByteLevel"]
    if len(bytelevel) != 1 or len(splits) + len(bytelevel) != len(steps) or len(splits) > 1:
        _fail(path, f"pre_tokenizer {[p.get('type') for p in steps]} is not [Split(Regex)], ByteLevel")
    if bytelevel[0].get("add_prefix_space"):
        _fail(path, "ByteLevel(add_prefix_space=true) is not supported")
    if splits:
        split = splits[0]
        if "Regex" not in split.get("pattern", {}) or split.get("behavior") != "Isolated" or split.get("invert"):
            _fail(path, f"pre_tokenizer Split {split} is not an Isolated, non-inverted Regex split")
        if bytelevel[0].get("use_regex", True):
            _fail(path, "a Split regex followed by ByteLevel(use_regex=true) is not supported")
        return split["pattern"]["Regex"]
    if not bytelevel[0].get("use_regex", True):
        _fail(path, "ByteLevel(use_regex=false) without a Split regex is not supported")
    return GPT2_PATTERN


def _byte_level_ranks(path, model, added_ids):
    """vocab {string: id} -> tiktoken ranks {bytes: id}, after checking the file is plain byte-level BPE whose merge
    order equals id order (the condition under which tiktoken's lowest-rank-result merging equals HF's merges)."""
    if model.get("type") != "BPE":
        _fail(path, f"model type {model.get('type')!r} is not BPE")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        _fail(path, "BPE with byte_fallback / continuing_subword_prefix / end_of_word_suffix (SentencePiece-style)")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for piece, i in model["vocab"].items():
        if i in added_ids:  # trainer-style files also list the special tokens in the BPE vocab
            continue
        try:
            ranks[bytes(decoder[c] for c in piece)] = i
        except KeyError:
            _fail(path, f"vocab entry {piece!r} (id {i}) is not byte-level (a character outside bytes_to_unicode)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        _fail(path, f"the vocab lacks {len(missing)} of the 256 single-byte tokens (e.g. byte {missing[0]})")
    last = -1
    for k, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        merged = ranks.get(bytes(decoder[c] for c in a + b))
        if merged is None or merged <= last:
            raise ValueError(f"{path}: merge {k} {a!r}+{b!r} yields id {merged}, after id {last}: merge order differs "
                             "from id order, so tiktoken ranks would not reproduce this BPE exactly")
        last = merged
    return ranks


# -----------------------------------------------------------------------------
# Llama / Vicuna SentencePiece-style BPE with byte fallback, merge rule written out

METASPACE = "\u2581"  # "▁", SentencePiece's visible space


HEXDIGITS = set("0123456789abcdefABCDEF")


def _byte_piece(piece):
    """"<0x41>" -> 0x41; None for anything else (tokenizers' ByteFallback test: 6 chars, <0x..>, hex)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and all(c in HEXDIGITS for c in piece[3:5]):
        return int(piece[3:5], 16)
    return None


class LlamaBPE:
    """Exact by construction: the merge rule of `tokenizers`' BPE model written out, not emulated with tiktoken.

    Per text segment between added tokens:
    1. " " -> "▁", and a leading "▁": with Metaspace(prepend_scheme="first", split=false) and no normalizer, only
       the segment at character offset 0 gets one, unless it already starts with one. With the legacy normalizer
       Sequence[Prepend("▁"), Replace(" ", "▁")] every non-empty segment gets one, even after an added token or
       before a "▁" ("a<video>b" -> "▁a", <video>, "▁b"); added tokens marked normalized=true are then matched in
       that normalized text as their normalized content ("<s>" as "▁<s>", so " <s>" matches but "a<s>" does not).
    2. The whole segment (legacy: each piece between normalized added tokens) is one BPE word. Its initial symbols
       are its characters' ids; a character not in the vocab becomes the ids of its UTF-8 bytes `<0xNN>` (byte
       fallback).
    3. Repeatedly merge the adjacent pair with the lowest index in `merges`, leftmost first on ties (a heap of
       (rank, position), stale entries skipped: O(n log n) however long the segment).
    Speed without changing the result: a boundary between characters x and y can only be crossed by a merge if
    some merge *result* contains the bigram "xy". So the segment is cut at "▁" and "\\n" wherever no merge result
    holds the bigram there (`self._cut`); the chunks (≈ words) are merged independently and cached.
    """

    def __init__(self, vocab, merges, prepend_scheme="first", ignore_merges=False, added=None, normalized=None):
        self.vocab = vocab                                  # {piece: id}
        self.pieces = {i: p for p, i in vocab.items()}      # id -> piece
        self.pieces.update({i: p for p, i in (added or {}).items()})  # added tokens decode through the same chain
        self.prepend_scheme, self.ignore_merges = prepend_scheme, ignore_merges  # prepend_scheme "legacy": see 1.
        # legacy: {added token: id} of those matched after normalizing; tokenizers also decodes them as the
        # normalized string ("▁<s>"), which its skip_special_tokens then does not recognize as special
        self.normalized_tokens = set(normalized or ())      # their raw strings, which the raw split leaves alone
        self.normalized = {_legacy_normalize(t): i for t, i in (normalized or {}).items()}
        self.pieces.update({i: p for p, i in self.normalized.items()})
        longest = sorted(self.normalized, key=len, reverse=True)  # leftmost-longest, as the raw split
        self._split_normalized = re.compile("(" + "|".join(map(re.escape, longest)) + ")") if longest else None
        self.byte_ids = [vocab[f"<0x{b:02X}>"] for b in range(256)]
        self.merges = {}                                    # (left id, right id) -> (rank, merged id)
        bigrams, byte_merge = set(), False
        fallback = set(self.byte_ids)
        for rank, (a, b) in enumerate(merges):
            self.merges[(vocab[a], vocab[b])] = (rank, vocab[a + b])   # a later duplicate wins, as in tokenizers
            byte_merge |= vocab[a] in fallback or vocab[b] in fallback
            merged = a + b
            bigrams.update(merged[k:k + 2] for k in range(len(merged) - 1))
        self._cut = None
        if not byte_merge:  # a merge of <0xNN> symbols would join text whose characters are not in the piece strings
            rules = []
            for y in (METASPACE, "\n"):
                before = "".join(re.escape(x) for x in sorted({g[0] for g in bigrams if g[1] == y}))
                after = "".join(re.escape(z) for z in sorted({g[1] for g in bigrams if g[0] == y}))
                rules.append((f"(?<![{before}])" if before else "") + f"(?={re.escape(y)})")
                rules.append(f"(?<={re.escape(y)})" + (f"(?![{after}])" if after else ""))
            self._cut = re.compile("|".join(rules))
        self._cache = {}                                    # chunk -> tuple of ids

    def encode(self, segment, at_start):
        """One non-empty segment between (raw-matched) added tokens -> ids. `at_start`: it begins at offset 0."""
        if self.prepend_scheme == "legacy":
            text = _legacy_normalize(segment)
            ids = []
            for k, part in enumerate(self._split_normalized.split(text) if self._split_normalized else [text]):
                if k % 2:  # odd entries are the normalized added tokens
                    ids.append(self.normalized[part])
                elif part:
                    ids.extend(self._word(part))
            return ids
        segment = segment.replace(" ", METASPACE)
        if (self.prepend_scheme == "always" or (self.prepend_scheme == "first" and at_start)) \
                and not segment.startswith(METASPACE):
            segment = METASPACE + segment
        return self._word(segment)

    def _word(self, word):
        """One BPE word (already "▁"-encoded) -> ids."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids, cache = [], self._cache
        for chunk in (self._cut.split(word) if self._cut else [word]):
            hit = cache.get(chunk)
            if hit is None:
                hit = self._bpe(chunk)
                if len(chunk) <= 64:  # words repeat; long runs rarely do and would bloat the cache
                    if len(cache) >= 200_000:
                        cache.clear()
                    cache[chunk] = hit
            ids.extend(hit)
        return ids

    def _bpe(self, chunk):
        vocab, merges = self.vocab, self.merges
        syms = []
        for c in chunk:
            i = vocab.get(c)
            if i is None:
                syms.extend(self.byte_ids[b] for b in c.encode("utf-8"))
            else:
                syms.append(i)
        n = len(syms)
        if n < 2:
            return tuple(syms)
        nxt = list(range(1, n + 1))                         # linked list over positions; n = end
        prv = list(range(-1, n - 1))
        heap = []
        for k in range(n - 1):
            m = merges.get((syms[k], syms[k + 1]))
            if m is not None:
                heap.append((m[0], k, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, k, new = heapq.heappop(heap)
            j = nxt[k]
            if syms[k] is None or j >= n or merges.get((syms[k], syms[j])) != (rank, new):
                continue                                    # stale: a neighbour merged since this was pushed
            syms[k], syms[j] = new, None
            nxt[k] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = k
            p = prv[k]
            if p >= 0:
                m = merges.get((syms[p], new))
                if m is not None:
                    heapq.heappush(heap, (m[0], p, m[1]))
            if nxt[k] < n:
                m = merges.get((new, syms[nxt[k]]))
                if m is not None:
                    heapq.heappush(heap, (m[0], k, m[1]))
        return tuple(s for s in syms if s is not None)

    def decode(self, ids):
        """tokenizers' Llama decoder: Replace("▁", " "), ByteFallback (a run of <0xNN> that is not valid UTF-8
        becomes one U+FFFD per byte), Fuse, Strip one leading space."""
        out, run = [], bytearray()
        for i in ids:
            piece = self.pieces.get(i)
            if piece is None:  # past the vocabulary: dropped, as tokenizers does
                continue
            b = _byte_piece(piece)
            if b is not None:
                run.append(b)
                continue
            if run:
                out.append(_utf8_or_replacement(run))
                run = bytearray()
            out.append(piece.replace(METASPACE, " "))
        if run:
            out.append(_utf8_or_replacement(run))
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


def _legacy_normalize(text):
    """The legacy Llama normalizer Sequence[Prepend("▁"), Replace(" ", "▁")]; Prepend skips the empty string."""
    return METASPACE + text.replace(" ", METASPACE) if text else text


def _utf8_or_replacement(run):
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


# the two layouts' normalizers and their shared decoder, as tokenizers writes them in tokenizer.json
LEGACY_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": METASPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}]}
LLAMA_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": METASPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


def _kind(step):
    """A normalizer / pre-tokenizer / decoder entry named for an error message: "Sequence[Prepend, Replace]"."""
    if not step:
        return "none"
    inner = step.get("normalizers", step.get("pretokenizers", step.get("decoders")))
    return step.get("type") + (f"[{', '.join(_kind(x) for x in inner)}]" if inner is not None else "")


def _llama_bpe(path, spec, added):
    """tokenizer.json of the Llama family -> LlamaBPE, after checking it is one of the structures reproduced above."""
    model, pre, normalizer = spec.get("model", {}), spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if normalizer == LEGACY_NORMALIZER and not pre:
        scheme = "legacy"
    elif normalizer is None and pre.get("type") == "Metaspace":
        if pre.get("replacement") != METASPACE or pre.get("split") or pre.get("prepend_scheme") not in (
                "first", "always", "never"):
            _fail(path, f"Metaspace {pre} is not replacement='▁', split=false, prepend_scheme first/always/never")
        scheme = pre["prepend_scheme"]
    else:
        _fail(path, f"normalizer {_kind(normalizer)} with pre_tokenizer {_kind(pre)} is neither Llama layout "
                    "(no normalizer + Metaspace, or the legacy Llama normalizer Sequence[Prepend('▁'), "
                    "Replace(' ', '▁')] + no pre_tokenizer)")
    if spec.get("decoder") != LLAMA_DECODER:
        _fail(path, f"decoder {_kind(spec.get('decoder'))} is not the Llama decoder "
                    "Sequence[Replace('▁', ' '), ByteFallback, Fuse, Strip(' ', 1, 0)]")
    if model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("dropout") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        _fail(path, "the model is not a plain BPE with byte_fallback=true")
    vocab = model["vocab"]
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        _fail(path, f"byte fallback without the 256 <0xNN> tokens ({len(missing)} missing, e.g. <0x{missing[0]:02X}>)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    for k, m in enumerate(merges):
        if len(m) != 2 or m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab:
            raise ValueError(f"{path}: merge {k} {m} names a piece that is not in the vocab; the file is corrupt")
    normalized = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("normalized")}
    return LlamaBPE(vocab, merges, scheme, bool(model.get("ignore_merges")), added,
                    normalized if scheme == "legacy" else None)  # without a normalizer, one raw split is the same


class Tokenizer:
    """encode/decode equal `tokenizers.Tokenizer.from_file(tokenizer.json).encode(text, add_special_tokens=False)`."""

    def __init__(self, enc, normalize, special, family=None, eos_id=None, stop_ids=(), pad_id=None,
                 video_token_id=None, image_token_id=None, skip_ids=None, bos_id=None, llama=None, temporal_patch=2):
        self.enc = enc                  # tiktoken.Encoding (ranks = token ids) for byte-level BPE, else None
        self.llama = llama              # LlamaBPE for the SentencePiece-style family, else None
        self.normalize = normalize      # "NFC" or None, applied per segment between added tokens
        self.special = special          # {added-token string: id}, matched in raw text (but see LlamaBPE's legacy)
        self.family = family
        self._skip_ids = set(special.values()) if skip_ids is None else set(skip_ids)  # those with special=true
        # longest first: HF splits on added tokens leftmost-longest ("<|im_end|>" before a hypothetical "<|im");
        # the legacy Llama layout matches its normalized=true ones later, in the normalized text (LlamaBPE)
        raw = [t for t in special if llama is None or t not in llama.normalized_tokens]
        alternatives = sorted(raw, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if raw else None
        self.eos_id, self.stop_ids, self.pad_id = eos_id, tuple(stop_ids), pad_id
        self.video_token_id, self.image_token_id = video_token_id, image_token_id
        self.temporal_patch = temporal_patch  # frames per Qwen frame pair (qwen3_vl's timestamps are per pair)
        self.bos_id = bos_id            # prepended by encode_prompt (Llama's `<s> $A` post-processor), or None
        # ids 0 .. vocab_size-1 (embedding tables may have padding rows beyond)
        self.vocab_size = enc.n_vocab if llama is None else max(llama.pieces) + 1

    @classmethod
    def from_pretrained(cls, path):
        """Build from a checkpoint directory (or a tokenizer.json path). Family, special ids and stop ids come from
        the directory's config.json / generation_config.json / tokenizer_config.json when present."""
        path = os.fspath(path)
        if path.endswith(".json"):
            directory, file = os.path.dirname(path), path
        else:
            directory, file = path, os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ValueError(f"no tokenizer.json at {file}: point at a Hugging Face checkpoint directory that has one "
                             "(a slow-tokenizer-only checkpoint must be converted with transformers first)")
        with open(file, encoding="utf-8") as f:
            spec = json.load(f)
        normalizer = spec.get("normalizer")
        # SentencePiece-style (Llama): a Metaspace pre-tokenizer, or the legacy layout's byte-fallback BPE
        sentencepiece = (spec.get("pre_tokenizer") or {}).get("type") == "Metaspace" \
            or (spec.get("model") or {}).get("byte_fallback")
        if normalizer is not None and normalizer.get("type") != "NFC" and not sentencepiece:
            _fail(file, f"normalizer {_kind(normalizer)} (only NFC or none)")
        added = spec.get("added_tokens", [])
        for t in added:
            # the Llama layouts: "normalized" is reproduced by LlamaBPE (legacy) or harmless (no normalizer)
            if (t.get("normalized") and not sentencepiece) or t.get("lstrip") or t.get("rstrip") \
                    or t.get("single_word"):
                raise ValueError(f"{file}: added token {t['content']!r} uses normalized/lstrip/rstrip/single_word, "
                                 "which this tokenizer does not reproduce")
        special = {t["content"]: t["id"] for t in added}
        enc = llama = None
        if sentencepiece:
            llama = _llama_bpe(file, spec, special)
        else:
            ranks = _byte_level_ranks(file, spec.get("model", {}), set(special.values()))
            enc = tiktoken.Encoding(name=os.path.basename(os.path.abspath(directory)) or "tokenizer",
                                    pat_str=_pattern(file, spec.get("pre_tokenizer")),
                                    mergeable_ranks=ranks, special_tokens=special)

        def read(name):
            p = os.path.join(directory, name)
            if not os.path.isfile(p):
                return {}
            with open(p, encoding="utf-8") as f:
                return json.load(f)

        config, generation = read("config.json"), read("generation_config.json")
        tok_config = read("tokenizer_config.json")
        family = config.get("model_type")
        qwen = family in ("qwen2_5_vl", "qwen3_vl")  # Qwen-VL's media tokens are <|video_pad|> / <|image_pad|>

        def token_id(key, name):
            """An id from config.json when written there, checked against the tokenizer's own added token."""
            from_config = config.get(key + "_index", config.get(key + "_id"))
            own = special.get(name)
            if from_config is not None and own is not None and from_config != own:
                raise ValueError(f"{directory}: config.json says {key}={from_config} but tokenizer.json has "
                                 f"{name}={own}; the checkpoint's tokenizer and config disagree")
            return from_config if from_config is not None else own

        def named(value):  # tokenizer_config fields are a string or an AddedToken dict
            value = value.get("content") if isinstance(value, dict) else value
            return special.get(value) if value else None

        # ChatML ends a turn with <|im_end|>; that, not the config's eos, is what a chat reply stops on.
        # Vicuna ends one with </s>.
        eos_id = special.get("<|im_end|>", named(tok_config.get("eos_token")))
        eos_id = special.get("</s>") if eos_id is None else eos_id
        # BOS: what `<s> $A` (TemplateProcessing) prepends with add_special_tokens; tokenizer_config's
        # add_bos_token, when written, overrides it the way transformers' LlamaTokenizer rebuilds its post-processor
        post = spec.get("post_processor") or {}
        first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
        bos_id = special.get(first["SpecialToken"]["id"]) if "SpecialToken" in first else None
        if "add_bos_token" in tok_config:
            bos_id = named(tok_config.get("bos_token")) if tok_config["add_bos_token"] else None
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        stops = [eos_id] + (eos if isinstance(eos, list) else [eos]) + [special.get("<|endoftext|>")]
        stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
        pad_id = named(tok_config.get("pad_token"))
        pad_id = pad_id if pad_id is not None else special.get("<|endoftext|>", eos_id)
        skip_ids = {t["id"] for t in added if t.get("special")}
        if llama is not None:  # tokenizers' skip_special_tokens misses a normalized one (decoded as "▁<s>")
            skip_ids -= set(llama.normalized.values())
        return cls(enc, "NFC" if enc is not None and normalizer else None, special, family=family, eos_id=eos_id,
                   stop_ids=stop_ids, pad_id=pad_id,
                   video_token_id=token_id("video_token", "<|video_pad|>" if qwen else "<video>"),
                   image_token_id=token_id("image_token", "<|image_pad|>" if qwen else "<image>"),
                   skip_ids=skip_ids, bos_id=bos_id, llama=llama,
                   temporal_patch=(config.get("vision_config") or {}).get("temporal_patch_size", 2))

    def encode(self, text):
        """text -> ids; added-token strings anywhere in the text become their ids (HF's add_special_tokens=False)."""
        segments = self._split.split(text) if self._split else [text]
        ids = []
        for k, segment in enumerate(segments):
            if k % 2:  # odd entries are the captured added tokens
                ids.append(self.special[segment])
            elif segment and self.llama is not None:
                ids.extend(self.llama.encode(segment, at_start=k == 0))  # segment 0 starts at offset 0
            elif segment:
                if self.normalize and not unicodedata.is_normalized(self.normalize, segment):
                    segment = unicodedata.normalize(self.normalize, segment)
                ids.extend(self.enc.encode_ordinary(segment))
        return ids

    def decode(self, ids, skip_special=False):
        """ids -> text; invalid UTF-8 (a reply cut mid-character) becomes U+FFFD as in HF's ByteLevel decoder.
        skip_special drops the added tokens marked special, like HF's skip_special_tokens."""
        if skip_special:
            ids = [i for i in ids if i not in self._skip_ids]
        if self.llama is not None:
            return self.llama.decode(ids)
        # ids past the vocabulary (the padded embedding rows a model can still emit) decode to nothing, like tokenizers
        ids = [i for i in ids if 0 <= i <= self.enc.max_token_value]
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_prompt(self, text, num_video_tokens):
        """encode, then repeat each <video> id num_video_tokens times, as the processor lays out input_ids; BOS first
        where the tokenizer adds one (llava_next_video's `<s>`; the processor tokenizes with add_special_tokens)."""
        assert self.video_token_id is not None, "this tokenizer has no <video> token"
        ids = [] if self.bos_id is None else [self.bos_id]
        for i in self.encode(text):
            ids.extend([i] * num_video_tokens if i == self.video_token_id else [i])
        return ids

    def video_prompt(self, text, num_video_tokens, num_frames=None):
        """Prompt ids for one video and one user turn, as every script builds them: the family's chat template with
        the video before the text (where the HF templates put it), the generation prompt last, <video> expanded.
        qwen3_vl also needs num_frames: its processor puts a timestamp before each frame pair (`qwen3_video_text`)."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        prompt = chat_prompt(self.family, messages)
        if self.family != "qwen3_vl":
            return self.encode_prompt(prompt, num_video_tokens)
        if num_frames is None:
            raise TypeError("qwen3_vl prompts put a timestamp before each frame pair: pass num_frames to video_prompt")
        pairs = -(-num_frames // self.temporal_patch)
        assert num_video_tokens % pairs == 0, f"{num_video_tokens} video tokens do not split into {pairs} frame pairs"
        prompt = prompt.replace("<|video_pad|>", qwen3_video_text(num_frames, self.temporal_patch), 1)
        return self.encode_prompt(prompt, num_video_tokens // pairs)

    def response(self, text):
        """Ids of an assistant reply that follows `video_prompt`, ending with the end-of-turn id (a training target).
        llava_next_video's generation prompt "ASSISTANT:" is followed by a space; ChatML's ends with a newline."""
        lead = " " if self.family == "llava_next_video" else ""
        return self.encode(lead + text) + [self.eos_id]


# -----------------------------------------------------------------------------
# chat prompts: the hub chat templates rendered in Python

def _parts(content):
    """A message's content as HF lists it: [{"type": "video"|"image"|"text", ...}]; a plain string is one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def qwen3_video_text(num_frames, temporal_patch=2, fps=QWEN3_FRAMES_FPS):
    """What Qwen3VLProcessor (transformers 5.24) puts in place of <|video_pad|> for `num_frames` frames at `fps`
    (frame i at i / fps s): per frame pair `<t seconds><|vision_start|><|video_pad|><|vision_end|>`, t the mean of
    the pair's first and last frame times to one decimal (an odd last pair repeats the last frame), one <|video_pad|>
    per pair for encode_prompt to expand. 5.24 replaces the <|video_pad|> alone, so the template's own
    <|vision_start|> / <|vision_end|> stay around the whole video (4.57 replaced all three)."""
    times = [i / fps for i in range(num_frames)]
    times += times[-1:] * (-num_frames % temporal_patch)
    pairs = [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]
    return "".join(f"<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>" for t in pairs)


def chat_prompt(family, messages, add_generation_prompt=True):
    """messages [{"role", "content"}] -> prompt text, exactly as the family's HF chat template renders it:
    per message, images then videos first (whatever their place in the list), then the texts; no default system
    prompt. llava_onevision: ChatML `<|im_start|>role\\n<video>\\ntext<|im_end|>\\n`, generation prompt
    `<|im_start|>assistant\\n`. llava_next_video: `USER: <video>\\ntext ` with no role prefix for system, and
    `ASSISTANT:` as generation prompt (its tokenizer adds BOS, not the template). qwen2_5_vl: ChatML with the
    default system turn "You are a helpful assistant." unless the first message is a system one, parts in their
    own order, a video as `<|vision_start|><|video_pad|><|vision_end|>` (an image with `<|image_pad|>`), no
    separator before the text. qwen3_vl: the same without a default system turn (the Qwen3-VL Instruct hub template,
    as recalled: no test here can read the hub file)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    out = []
    if family in ("qwen2_5_vl", "qwen3_vl"):
        if family == "qwen2_5_vl" and messages and messages[0]["role"] != "system":
            out.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        pads = {kind: f"<|vision_start|><|{kind}_pad|><|vision_end|>" for kind in ("image", "video")}
        for message in messages:
            body = "".join(p["text"] if p["type"] == "text" else pads[p["type"]] for p in _parts(message["content"]))
            out.append(f"<|im_start|>{message['role']}\n{body}<|im_end|>\n")
        return "".join(out) + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    for message in messages:
        role, parts = message["role"], _parts(message["content"])
        media = "".join("<image>\n" for p in parts if p["type"] == "image")
        media += "".join("<video>\n" for p in parts if p["type"] == "video")
        if family == "llava_onevision":
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            out.append(f"<|im_start|>{role}\n{media}{text}<|im_end|>\n")
        else:
            text = "".join(p["text"] + " " for p in parts if p["type"] == "text")
            out.append(("" if role == "system" else role.upper() + ": ") + media + text)
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n" if family == "llava_onevision" else "ASSISTANT:")
    return "".join(out)
