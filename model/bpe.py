"""Train a byte-level BPE tokenizer from scratch, in the style of minbpe, for tiktoken to run.

Training, as in GPT-2:
1. Split the text on special-token strings (they never take part in merges, as when encoding), then into
   chunks with GPT-2's pre-tokenization regex, and count each distinct chunk's UTF-8 bytes. Merges never
   cross a chunk, so from here on the work scales with the number of distinct chunks, not corpus size.
2. Start with the 256 single-byte tokens and repeatedly merge the most frequent adjacent pair of tokens
   (counting each chunk as often as it occurs) into a new token.

Pair counts are kept up to date incrementally: a merge only revisits the chunks that contain its pair,
and a heap of (-count, pair) finds the next one, so each merge costs about the work its chunks need.

The merged tokens become tiktoken ranks in merge order, which is the order tiktoken applies them in.
"""

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise

import regex

from model.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer, bpe_tokenizer

Pair = tuple[int, int]
_CHUNK_RE = regex.compile(GPT2_PATTERN)


def _count_chunks(texts: str | Iterable[str], special_tokens: list[str]) -> Counter[bytes]:
    """How often each pre-token chunk (as UTF-8 bytes) occurs in texts, each piece split on its own."""
    if isinstance(texts, str):
        texts = [texts]
    # Longest first, as tiktoken matches special tokens when encoding.
    specials = sorted(special_tokens, key=len, reverse=True)
    special_re = regex.compile("|".join(regex.escape(s) for s in specials))
    counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be a str or an iterable of str, got a {type(text).__name__} piece")
        for piece in special_re.split(text):
            counts.update(_CHUNK_RE.findall(piece))
    # Encoding each distinct chunk once, not each occurrence, keeps counting at regex speed.
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def _validate(vocab_size: int, special_tokens) -> list[str]:
    if isinstance(special_tokens, str):
        raise ValueError(f"special_tokens must be a sequence of strings, not the string {special_tokens!r}")
    specials = list(special_tokens)
    if any(not isinstance(s, str) or not s for s in specials):
        raise ValueError(f"special tokens must be non-empty strings, got {specials!r}")
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens must be unique, got {specials!r}")
    if ENDOFTEXT not in specials:
        raise ValueError(f"special tokens must include {ENDOFTEXT!r} (Tokenizer.eot_id), got {specials!r}")
    if type(vocab_size) is not int or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be an int >= 256 bytes + {len(specials)} special tokens "
                         f"= {256 + len(specials)}, got {vocab_size!r}")
    return specials


def _merge(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """word with every occurrence of pair, left to right, replaced by new_id."""
    a, b = pair
    out = []
    i, n = 0, len(word)
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _learn_merges(chunk_counts: Counter[bytes], n_tokens: int) -> list[bytes]:
    """Token bytes in rank order: the 256 bytes, then merged tokens until there are n_tokens of them or
    no adjacent pair is left (then fewer).

    The most frequent pair wins; ties go to the smallest (left id, right id), so the result depends only
    on the counts, not on the order the chunks came in.
    """
    tokens = [bytes([b]) for b in range(256)]
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts: dict[Pair, int] = defaultdict(int)
    # Chunks that contain (or once contained) each pair; stale entries only cost a look that finds nothing.
    where: dict[Pair, set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(tokens) < n_tokens and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # stale: every count change pushed a fresh entry
        # Never the bytes of an earlier token: wherever a byte string ends up covered by whole tokens it
        # went through the same merges as everywhere else, so the merge that first made these bytes took
        # every other split of them too (and bpe_tokenizer would reject a duplicate).
        new_id = len(tokens)
        tokens.append(tokens[pair[0]] + tokens[pair[1]])

        delta: dict[Pair, int] = defaultdict(int)
        for w in where.pop(pair):
            word = words[w]
            new_word = _merge(word, pair, new_id)
            if len(new_word) == len(word):
                continue
            freq = freqs[w]
            for p in pairwise(word):
                delta[p] -= freq
            for p in pairwise(new_word):
                delta[p] += freq
                where[p].add(w)
            words[w] = new_word
        for p, d in delta.items():
            if d == 0:
                continue
            count = pair_counts[p] + d
            if count:
                pair_counts[p] = count
                heapq.heappush(heap, (-count, p))
            else:
                del pair_counts[p]
                where.pop(p, None)
    return tokens


def train_bpe(texts: str | Iterable[str], vocab_size: int,
              special_tokens: Iterable[str] = (ENDOFTEXT,)) -> Tokenizer:
    """A byte-level BPE Tokenizer with vocab_size ids (256 bytes + merges + special tokens) learned
    from texts: a str, or an iterable of str pieces so a large corpus can be streamed.

    Pieces are pre-tokenized one by one, so a chunk ends at every piece boundary. Pieces cut just before
    a space that follows a non-space character (as model.data cuts files) train exactly as their joined
    text: a letter, digit or punctuation run ends there anyway, and the chunk starting at the space is
    matched the same way. Cuts elsewhere (inside a word, after whitespace, inside a special token) split
    or change chunks there, which only matters if they are frequent.

    Special tokens get the ids after the merged tokens, in the order given, and must include
    "<|endoftext|>". If the corpus runs out of adjacent pairs first, training stops early and the
    tokenizer is smaller than vocab_size (check its .vocab_size). Raises ValueError for a vocab_size
    below 256 + len(special_tokens) or for empty, duplicate or missing special tokens.
    """
    specials = _validate(vocab_size, special_tokens)
    ranks = _learn_merges(_count_chunks(texts, specials), vocab_size - len(specials))
    return bpe_tokenizer(ranks, {s: len(ranks) + i for i, s in enumerate(specials)})
