"""mkdocs hook: in a table cell, `\\|` is a pipe, as on GitHub.

The pages are read on GitHub too. GitHub (GFM) needs a pipe inside a table cell escaped as `\\|`,
even inside a code span (`--format table\\|csv\\|json`), and shows it as `|`; Python-Markdown keeps
the backslash in a code span. So the site removes it from table cells after rendering, and both
show `table|csv|json`. Code blocks and text outside tables are left as they are.
"""

import re

_CELL = re.compile(r"(<t[dh](?:\s[^>]*)?>)(.*?)(</t[dh]>)", re.S)


def on_page_content(html: str, **kwargs: object) -> str:
    return _CELL.sub(lambda m: m.group(1) + m.group(2).replace("\\|", "|") + m.group(3), html)
