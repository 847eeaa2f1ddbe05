"""Shared plumbing of the experiment scripts: the repository on sys.path, output folder, markdown tables."""
import argparse
import glob
import os
import re
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*Pareto.*")
# The experiments record accuracy against references themselves (defaults.py records the warnings explicitly).
warnings.filterwarnings("ignore", message=".*may be unreliable.*")


def parse(description, argv=None, extra=()):
    p = argparse.ArgumentParser(description=description)
    for flag, text in extra:
        p.add_argument(flag, default="", help=text)
    p.add_argument("--out", default=os.path.join(ROOT, "results"))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (used by the tests)")
    p.add_argument("--no-nuts", action="store_true", help="skip timing NUTS where a script does")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return args


def write_table(frame, out, stem, title, note=""):
    """frame -> <out>/<stem>.csv and <out>/<stem>.md; returns the markdown text."""
    frame.to_csv(os.path.join(out, f"{stem}.csv"), index=False)
    text = f"### {title}\n\n{note}\n\n{frame.to_markdown(index=False, floatfmt='.3g')}\n"
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
    return text


def single_thread():
    import torch
    torch.set_num_threads(1)


# Where a block goes when its markers are in no page yet (a new block, or markers removed by hand): the page that
# holds its kind of result. A tag not named here goes to docs/experiments.md.
BLOCK_PAGES = {"yardstick": "docs/accuracy.md", "defaults": "docs/accuracy.md",
               "natural": "docs/features.md", "flows": "docs/features.md", "greeks": "docs/features.md",
               "policy_gradient": "docs/features.md", "blackbox": "docs/features.md",
               "experiments": "docs/experiments.md", "rao_blackwell": "docs/experiments.md",
               "stopping": "docs/experiments.md",
               "scale": "docs/speed.md", "bench": "docs/speed.md"}
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def block_pages(root=ROOT):
    """The pages a generated block may live in: README.md and every docs/*.md, relative to root."""
    pages = ["README.md"] + sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    return [p for p in pages if os.path.exists(os.path.join(root, p))]


def relink(block, page):
    """`block`'s relative links (written relative to the repository root, e.g. docs/figures/x.png) made relative to
    the folder of `page` (figures/x.png in docs/accuracy.md); absolute URLs and #anchors are left as they are."""
    folder = os.path.dirname(page)

    def fix(match):
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        return match.group(1) + os.path.relpath(path, folder or ".").replace(os.sep, "/") + hash_ + anchor + match.group(3)
    return _LINK.sub(fix, block)


def replace_readme_block(tag, heading, block, root=ROOT):
    """Put `block` between <!-- tag:start --> and <!-- tag:end --> in whichever page holds those markers: README.md
    or any docs/*.md (the generated blocks now live in docs/: accuracy.md, features.md, experiments.md, speed.md).
    Where no page has them, a section `## heading` with the block is appended to the page BLOCK_PAGES names for the
    tag (docs/experiments.md for a tag it does not name; the page is created if missing). The block's relative links
    are written relative to the repository root and rewritten relative to the page's folder. Markers in more than
    one page are an error (which one to write is then a guess). Returns the page written, relative to root."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    found = []
    for page in block_pages(root):
        with open(os.path.join(root, page), encoding="utf-8") as f:
            text = f.read()
        if start in text and end in text:
            found.append((page, text))
    if len(found) > 1:
        raise RuntimeError(f"the markers of block {tag!r} are in {[p for p, _ in found]}: keep them in one page")
    if found:
        page, text = found[0]
        block = f"{start}\n\n{relink(block, page).strip()}\n\n{end}"
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        page = BLOCK_PAGES.get(tag, "docs/experiments.md")
        path = os.path.join(root, page)
        text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
        block = f"{start}\n\n{relink(block, page).strip()}\n\n{end}"
        text = text.rstrip() + ("\n\n" if text.strip() else "") + f"## {heading}\n\n{block}\n"
    os.makedirs(os.path.dirname(os.path.join(root, page)) or ".", exist_ok=True)
    with open(os.path.join(root, page), "w", encoding="utf-8") as f:
        f.write(text)
    return page
