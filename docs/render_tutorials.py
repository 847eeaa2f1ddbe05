"""Render docs/index.md and every tutorial (docs/tutorials/*.py) as HTML beside the API reference.

    python docs/render_tutorials.py docs/api        # `make docs` runs this after pdoc

writes docs/api/tutorials/index.html (docs/index.md), docs/api/tutorials/NAME.html for each tutorial: its
module docstring, then the script top to bottom, each run of whole-line comments at the left margin as text
(markdown) and the code between them highlighted; and docs/api/tutorials/PAGE.html for each other page docs/PAGE.md
(features, accuracy, speed, ...: links between pages become links between their HTML pages). Nothing is imported or run. A link in docs/index.md to a
tutorial that does not exist is an error; a tutorial that docs/index.md does not link is rendered under a heading
of its own with a warning (and tests/test_tutorials.py fails until it is linked).
"""
import ast
import html
import os
import re
import sys

import markdown2
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

DOCS = os.path.dirname(os.path.abspath(__file__))
TUTORIALS = os.path.join(DOCS, "tutorials")
EXTRAS = ["fenced-code-blocks", "tables", "code-friendly", "header-ids", "cuddled-lists"]
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
HEADING = re.compile(r"^-{2,}\s*(.+?)\s*-*$")   # "# ---- 1. Boolean latents ----" -> a heading

STYLE = """
body { font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0; }
main { max-width: 58rem; margin: 0 auto; padding: 1rem 1.5rem 4rem; }
nav { background: #f3f4f6; border-bottom: 1px solid #ddd; padding: .6rem 1.5rem; font-size: 15px; }
nav a { margin-right: 1.2rem; }
a { color: #0b5cad; }
h1 { font-size: 1.7rem; } h2 { font-size: 1.35rem; margin-top: 2rem; } h3 { font-size: 1.15rem; margin-top: 2rem; }
code { background: #f3f4f6; padding: .05em .25em; border-radius: 3px; font-size: 90%; }
pre { background: #f7f7f9; border: 1px solid #e3e3e8; border-radius: 4px; padding: .7rem .9rem; overflow-x: auto;
      font-size: 14px; line-height: 1.4; }
pre code { background: none; padding: 0; font-size: 100%; }
.docstring { border-left: 4px solid #0b5cad33; padding-left: 1rem; }
.highlight { margin: .4rem 0 1rem; }
"""


def _page(title, body, depth_to_api="../"):
    css = STYLE + HtmlFormatter(style="default").get_style_defs(".highlight")
    return (f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)} - bbvi</title>\n<style>{css}</style>\n</head>\n<body>\n"
            f"<nav><a href=\"{depth_to_api}bbvi.html\">API reference</a>"
            f"<a href=\"index.html\">Tutorials</a></nav>\n"
            f"<main>\n{body}\n</main>\n</body>\n</html>\n")


def _markdown(text):
    return markdown2.markdown(text, extras=EXTRAS)


def _code(lines):
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return highlight("\n".join(lines), PythonLexer(), HtmlFormatter()) if lines else ""


def _is_text(line):
    return line.startswith("#") and not line.startswith("#!")


def _comment_text(lines):
    out = []
    for line in lines:
        text = line[1:][1:] if line[1:2] == " " else line[1:]
        match = HEADING.match(text.strip())
        out.append(f"\n### {match.group(1)}\n" if match else text)
    return "\n".join(out)


def render_tutorial(path, title):
    """HTML of one tutorial: the docstring, then comments as text and code as highlighted blocks, in order."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, filename=path)
    doc = ast.get_docstring(tree, clean=True)
    if not doc:
        raise SystemExit(f"{path}: a tutorial starts with a module docstring that says what it shows")
    lines = source.splitlines()[tree.body[0].end_lineno:]
    blocks = []                                   # [is_text, [lines]]
    for line in lines:
        kind = _is_text(line)
        if blocks and blocks[-1][0] == kind:
            blocks[-1][1].append(line)
        else:
            blocks.append([kind, [line]])
    name = os.path.basename(path)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p><code>docs/tutorials/{html.escape(name)}</code></p>",
             f"<div class=\"docstring\">{_markdown(doc)}</div>"]
    for is_text, chunk in blocks:
        parts.append(_markdown(_comment_text(chunk)) if is_text else _code(chunk))
    return _page(title, "\n".join(p for p in parts if p))


def render_index(out_dir, tutorials):
    """docs/index.md as the tutorials' index page: links to tutorials/NAME.py become NAME.html, other relative
    links are rewritten relative to the page's folder. Returns {script name: link text}."""
    with open(os.path.join(DOCS, "index.md"), encoding="utf-8") as f:
        text = f.read()
    titles = {}

    def relink(match):
        label, target = match.groups()
        if target.startswith("tutorials/") and target.endswith(".py"):
            titles[os.path.basename(target)] = label
        return _relink(label, target, out_dir)

    text = LINK.sub(relink, text)
    missing = sorted(set(titles) - set(tutorials))
    if missing:
        raise SystemExit(f"docs/index.md links tutorial(s) {missing} that docs/tutorials/ does not have")
    unlisted = sorted(set(tutorials) - set(titles))
    if unlisted:  # still rendered, under a heading of their own; tests/test_tutorials.py fails until linked
        print(f"warning: docs/index.md does not link the tutorial(s) {unlisted}: add them to its list",
              file=sys.stderr)
        text += "\n\n## Not yet in the list above\n\n"
        for name in unlisted:
            titles[name] = _first_line(os.path.join(TUTORIALS, name)) or name
            text += f"- [{name}]({name[:-3]}.html): {titles[name]}\n"
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(_page("Documentation", _markdown(text)))
    return titles


def _relink(label, target, out_dir):
    """A link of a page in docs/, for its HTML beside the tutorials' in out_dir: a tutorial becomes its page, another
    docs/*.md page its HTML (anchor kept), anything else relative to out_dir; URLs and anchors stay."""
    if re.match(r"^[a-z]+:|^#", target):
        return f"[{label}]({target})"
    if target.startswith("tutorials/") and target.endswith(".py"):
        return f"[{label}]({os.path.basename(target)[:-3]}.html)"
    path, hash_, anchor = target.partition("#")
    if path in page_names():
        return f"[{label}]({path[:-3]}.html{hash_}{anchor})"
    return f"[{label}]({os.path.relpath(os.path.join(DOCS, path), out_dir)}{hash_}{anchor})"


def page_names():
    """The Markdown pages of docs/ other than its index (features.md, accuracy.md, ...)."""
    return sorted(n for n in os.listdir(DOCS) if n.endswith(".md") and n != "index.md")


def render_page(name, out_dir):
    """HTML of the page docs/NAME.md, its links rewritten for out_dir (see _relink)."""
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        text = f.read()
    match = re.match(r"#\s+(.+)", text)
    title = match.group(1).strip() if match else name[:-3]
    text = LINK.sub(lambda m: _relink(m.group(1), m.group(2), out_dir), text)
    return _page(title, _markdown(text))


def _first_line(path):
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read(), filename=path)) or ""
    return doc.split("\n")[0].strip()


def tutorial_names():
    return sorted(n for n in os.listdir(TUTORIALS) if n.endswith(".py") and not n.startswith("_"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python docs/render_tutorials.py OUTPUT_DIR   (the API reference's folder)")
    out_dir = os.path.join(argv[0], "tutorials")
    os.makedirs(out_dir, exist_ok=True)
    names = tutorial_names()
    titles = render_index(out_dir, names)
    for name in names:
        page = render_tutorial(os.path.join(TUTORIALS, name), titles[name])
        with open(os.path.join(out_dir, name[:-3] + ".html"), "w", encoding="utf-8") as f:
            f.write(page)
    pages = page_names()
    for name in pages:
        with open(os.path.join(out_dir, name[:-3] + ".html"), "w", encoding="utf-8") as f:
            f.write(render_page(name, out_dir))
    print(f"wrote {out_dir}/index.html, {len(names)} tutorial pages and {len(pages)} other pages")


if __name__ == "__main__":
    main()
