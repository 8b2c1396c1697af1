"""A tiny umT5-style tokenizer folder for tests and the demo checkpoint, made offline in well under a second.

`write_tiny_tokenizer(folder, vocab_size)` trains a sentencepiece unigram model on a built-in English corpus
(generated sentences about coloured shapes moving) and writes the google/umt5-xxl folder layout, which
`wanrt.runtime.text.Tokenizer(folder)` loads through the same `AutoTokenizer` path as the real one:
    spiece.model              sentencepiece unigram model; pad=0, eos=1 (`</s>`), unk=2, no bos, as in T5
    tokenizer.json            the fast (tokenizers) form converted from spiece.model by transformers
    tokenizer_config.json     tokenizer_class T5Tokenizer, extra_ids, special tokens
    special_tokens_map.json
Like umT5 (256000 pieces + 384 `<extra_id_*>` sentinels = 256384 embedding rows), the sentinels fill the vocabulary up
to exactly `vocab_size`, so every id is < vocab_size. The output is byte-identical across runs.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey", "cyan",
           "golden", "silver")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "rectangle", "diamond", "ball", "cube", "ring", "cone",
          "heart")
SIZES = ("small", "large", "tiny", "big", "bright", "dark", "shiny", "soft")
MOTIONS = ("moves", "slides", "bounces", "spins", "rolls", "drifts", "jumps", "floats", "falls", "rises", "turns",
           "glides")
PATHS = ("left", "right", "up", "down", "in a circle", "across the screen", "slowly", "quickly", "towards the camera",
         "away from the camera", "back and forth", "over the hill")
PLACES = ("background", "sky", "floor", "wall", "canvas", "field", "table", "river")
# Every ASCII letter, digit and common punctuation mark, so ordinary English prompts rarely hit <unk>.
EXTRA = ("The quick brown fox jumps over the lazy dog.", "THE CAMERA PANS LEFT, THEN ZOOMS IN!",
         "0 1 2 3 4 5 6 7 8 9 10 100 2025", "\"quoted\" (bracketed) [boxed] {braced} a-b a_b a/b a:b a;b a?b a'b",
         "& % $ # @ * + = < > | ~ ^ `")
TEMPLATES = ("a {s} {c} {sh} {m} {p} on a {c2} {pl}", "{c} {sh} {m} {p}, {c2} {pl}",
             "the {sh} is {c} and {m} {p}.", "two {c} {sh}s {m} {p} over a {s} {c2} {pl}")


def corpus(n: int = 480) -> list[str]:
    """The built-in training sentences: n template sentences, then each word alone and with a full stop.

    The lone words matter: the unigram seeder keeps only maximal repeated substrings, and a word that is always
    followed by a space would otherwise never become a candidate piece.
    """
    lines = []
    for i in range(n):  # co-prime strides walk the combinations without any randomness
        lines.append(TEMPLATES[i % len(TEMPLATES)].format(
            s=SIZES[(i * 3) % len(SIZES)], c=COLOURS[i % len(COLOURS)], c2=COLOURS[(i * 5 + 3) % len(COLOURS)],
            sh=SHAPES[(i * 7) % len(SHAPES)], m=MOTIONS[(i * 5) % len(MOTIONS)], p=PATHS[(i * 11) % len(PATHS)],
            pl=PLACES[(i * 3 + 1) % len(PLACES)]))
    words = sorted({w.strip(".,") for line in lines for w in line.split()})
    return lines + words + [w + "." for w in words] + list(EXTRA)


# The vocabulary of a random full-size checkpoint's tokenizer: its ids index the first rows of umT5's 256,384-row
# table. Filling all 256k entries with sentinels would make the tokenizer take minutes to load.
RANDOM_VOCAB = 1000


def write_tiny_tokenizer(folder: str | Path, vocab_size: int = 1000) -> Path:
    """Train the tiny unigram model and write a google/umt5-xxl style tokenizer folder; returns the folder.

    The sentencepiece model holds min(vocab_size, what the corpus supports) pieces; `<extra_id_*>` sentinels fill the
    rest, so `len(tokenizer) == vocab_size`. Raises ValueError if vocab_size cannot hold the corpus alphabet.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_writer=model, model_type="unigram", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"cannot train a {vocab_size}-token tiny tokenizer: {e}") from None
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    assert pieces <= vocab_size, (pieces, vocab_size)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "spiece.model").write_bytes(model.getvalue())
    _write_json(folder / "tokenizer_config.json",
                {"tokenizer_class": "T5Tokenizer", "extra_ids": vocab_size - pieces, **special})
    _write_json(folder / "special_tokens_map.json", special)
    (folder / "tokenizer.json").unlink(missing_ok=True)  # convert from spiece.model, not from a stale file

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2) and len(tok) == vocab_size
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
