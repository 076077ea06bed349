"""Real English text that ships with every CPython: the Python documentation topics (pydoc_data).

Used where we need human-written text without a download: training the tiny builtin tokenizer,
tests, and the quality benchmark. Grammar blocks and code samples (indented lines) are dropped so
what remains is prose.
"""

from typing import List


def prose_documents() -> List[str]:
    """One string per documentation topic, prose paragraphs only, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    documents = []
    for key in sorted(topics):
        paragraphs = []
        for block in topics[key].split("\n\n"):
            lines = block.splitlines()
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue
            if all(set(line) <= set("*=-~^ ") for line in lines[1:]):
                continue  # a heading and its underline
            paragraphs.append(" ".join(line.strip() for line in lines))
        if paragraphs:
            documents.append("\n\n".join(paragraphs))
    return documents
