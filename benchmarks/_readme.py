"""Replacing one "## Heading" section of benchmarks/README.md (shared by scripts)."""

import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")


def replace_section(heading: str, section: str, readme: str = README) -> None:
    """Replaces the section that starts with ``## {heading}`` (or appends it)."""
    text = open(readme).read() if os.path.exists(readme) else "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(readme, "w") as fh:
        fh.write(text)
