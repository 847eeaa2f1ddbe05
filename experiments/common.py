"""Shared plumbing of the experiment scripts: the repository on sys.path, output folder, markdown tables."""
import argparse
import os
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


def replace_readme_block(tag, heading, block):
    """Put `block` between <!-- tag:start --> and <!-- tag:end --> in the README (appending a section with
    `heading` if the markers are missing)."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    block = f"{start}\n\n{block.strip()}\n\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text)
