"""Build the tiny preset's WordPiece vocabulary from open_clip's bundled BPE word list (MIT).

Run once; the output is committed as pipeline/assets/tiny_bert_vocab.txt.
"""

import gzip
import string
from pathlib import Path

import open_clip

N_WORDS = 6000
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def main() -> None:
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1:]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words: list[str] = []
    seen = set(chars)
    for line in merges:
        parts = line.split()
        if len(parts) != 2 or not parts[1].endswith("</w>"):
            continue
        word = (parts[0] + parts[1])[: -len("</w>")]
        if word.isalpha() and word.isascii() and word not in seen:
            seen.add(word)
            words.append(word)
        if len(words) >= N_WORDS:
            break
    vocab = SPECIAL + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + words
    out = Path(__file__).resolve().parents[1] / "pipeline/assets/tiny_bert_vocab.txt"
    out.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens to {out}")


if __name__ == "__main__":
    main()
