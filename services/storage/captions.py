"""Caption text: the trigger-word rule and the edits the Dataset tab applies to every caption."""
from __future__ import annotations

import re

from services.errors import InputError

_TRIGGER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,39}$")
# The most characters a caption may have, wherever it comes from (the table, the API, an imported
# .txt, an edit to every caption). The text encoders read a few hundred tokens (FLUX's T5: 512, some
# 2,000 characters of English); far past that a caption is a mistake, and a megabyte of one made
# every read of its dataset slow for everyone.
MAX_CAPTION_CHARS = 3000


# ---------------------------------------------------------------- the trigger word


def is_trigger_word(word: str) -> bool:
    """The one rule for trigger words: 1-40 letters, digits, _ or -, not starting with -."""
    return bool(_TRIGGER_RE.match(word))


def validate_trigger_word(word: str) -> str:
    word = (word or "").strip()
    if not word:
        raise InputError("The trigger word is empty.", hint="Type a short unique word such as TOK or MYDOG.")
    if not is_trigger_word(word):
        raise InputError(
            f"The trigger word {word!r} can't be used.",
            hint="Use 1-40 letters, digits, _ or -, no spaces (for example TOK or my_dog).",
        )
    return word


# ---------------------------------------------------------------- caption length


def caption_too_long(caption: str) -> str:
    """Why ``caption`` can't be kept ("" when it can)."""
    if len(caption) > MAX_CAPTION_CHARS:
        return f"{len(caption):,} characters, over the {MAX_CAPTION_CHARS:,} a caption may have"
    return ""


def check_caption_lengths(captions: dict[str, str]) -> None:
    """Refuse captions (file name -> text) of which any is too long, naming them: InputError."""
    long = [f"{file} ({len(text):,} characters)" for file, text in captions.items() if caption_too_long(text)]
    if long:
        shown = ", ".join(long[:3]) + (f" and {len(long) - 3} more" if len(long) > 3 else "")
        raise InputError(f"A caption may have at most {MAX_CAPTION_CHARS:,} characters; too long: {shown}. "
                         "Nothing was saved.", hint="Shorten the caption, then save it again.")


# ---------------------------------------------------------------- caption edits


def trigger_first(caption: str, trigger: str) -> str:
    """Put the trigger word at the start: ``"TOK, a man on a bike"``; idempotent."""
    caption = caption.strip()
    if caption == trigger or caption.startswith(trigger + ",") or caption.startswith(trigger + " "):
        return caption
    rest = re.sub(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", "", caption)
    rest = re.sub(r"\s+([,.;:])", r"\1", rest)
    rest = re.sub(r"\s{2,}", " ", rest).strip(" ,;")
    return f"{trigger}, {rest}" if rest else trigger


def find_replace(caption: str, find: str, replace: str) -> str:
    return caption.replace(find, replace) if find else caption


def add_affixes(caption: str, prefix: str, suffix: str) -> str:
    caption = caption.strip()
    if prefix and not caption.startswith(prefix):
        caption = f"{prefix}{caption}"
    if suffix and not caption.endswith(suffix):
        caption = f"{caption}{suffix}"
    return caption


def contains_trigger(caption: str, trigger: str) -> bool:
    return bool(re.search(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", caption))
