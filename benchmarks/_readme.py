"""Replacing one "## Heading" section of benchmarks/README.md (shared by scripts)."""

import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")


# Where the hand-written part of a section starts: a script that rewrites the
# section keeps everything from this line on (readings, earlier rows).
KEEP = "<!-- written by hand below: kept when a script rewrites the section -->"


def replace_section(heading: str, section: str, readme: str = README) -> None:
    """Replaces the section that starts with ``## {heading}`` (or appends it),
    keeping its hand-written tail (from the line KEEP on)."""
    text = open(readme).read() if os.path.exists(readme) else "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    old = pattern.search(text)
    if old:
        kept = old.group(0).partition(KEEP)
        if kept[1] and KEEP not in section:
            section = section.rstrip("\n") + "\n\n" + KEEP + kept[2]
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(readme, "w") as fh:
        fh.write(text)
