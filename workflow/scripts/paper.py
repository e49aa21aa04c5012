"""paper/main.md (+ main.tex) and the generated tables and figures -> paper/build/.

paper.md    main.md with every `<!-- include tables/NAME.md -->` line replaced by that table and image
            paths made relative to build/
paper.html  the same, rendered by markdown-it-py, figures embedded: one self-contained file
main.pdf    main.tex built with latexmk (it \\input{}s tables/*.tex and includes figures/*.pdf), when asked
"""


import base64
import re
import subprocess
import sys
from pathlib import Path

from markdown_it import MarkdownIt

INCLUDE = re.compile(r"^<!-- include (?P<path>\S+) -->$", re.M)
IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<path>[^)\s]+)\)")
STYLE = ("body{font-family:Georgia,serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.5}"
         "table{border-collapse:collapse;font-size:.85rem;margin:1rem 0}th,td{border-bottom:1px solid #ccc;"
         "padding:.2rem .6rem;text-align:left}img{max-width:100%}code{font-size:.9em}")


def resolve(source: Path) -> str:
    """main.md with its includes inlined (paths relative to paper/)."""
    text = source.read_text()
    return INCLUDE.sub(lambda m: (source.parent / m["path"]).read_text().strip(), text)


def build_markdown(text: str) -> str:
    return IMAGE.sub(lambda m: f"![{m['alt']}](../{m['path']})", text)


def build_html(text: str, root: Path) -> str:
    def embed(m):
        data = base64.b64encode((root / m["path"]).read_bytes()).decode()
        return f"![{m['alt']}](data:image/png;base64,{data})"

    body = MarkdownIt("commonmark").enable("table").render(IMAGE.sub(embed, text))
    title = next((line.lstrip("# ") for line in text.splitlines() if line.startswith("# ")), "paper")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")


def build_pdf(tex: Path, outdir: Path) -> None:
    subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", f"-outdir={outdir.resolve()}",
                    tex.name], cwd=tex.parent, check=True, stdout=sys.stderr, stderr=sys.stderr)


def main(md: Path, tex: Path, outputs: list[str], latex: bool) -> None:
    out = Path(outputs[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    text = resolve(md)
    (out / "paper.md").write_text(build_markdown(text))
    (out / "paper.html").write_text(build_html(text, md.parent))
    if latex:
        build_pdf(tex, out)


if __name__ == "__main__" and "snakemake" in globals():
    sys.stderr = open(snakemake.log[0], "w")
    main(Path(snakemake.input.md), Path(snakemake.input.tex), list(snakemake.output), snakemake.params.latex)
