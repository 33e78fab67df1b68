"""A larger local English corpus for the "why" experiments: the man pages of sections 1, 5, 7 and 8
installed on a Debian machine, roff requests and font escapes stripped, the first 8 MB.

    python docs/why_tiny/man_corpus.py /tmp/man_pages.txt
    python bench.py --dataset /tmp/man_pages.txt ...

It depends on what the machine has installed, so the numbers it gives are not for comparing across
machines; the experiment only compares methods on the same file.
"""
import glob
import gzip
import re
import sys


def clean(roff):
    lines = []
    for line in roff.splitlines():
        if line.startswith((".", "'")):
            continue  # roff requests and comments
        line = re.sub(r"\\s[-+]?\d|\\f[BIRP0-9]|\\f\(..|\\\*\(..|\\\*.|\\\(..|\\[&|^]", "", line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        if line.strip():
            lines.append(line)
    return "\n".join(lines)


def main(path, limit=8_000_000):
    total = 0
    with open(path, "w") as out:
        for f in sorted(glob.glob("/usr/share/man/man[1578]/*.gz")):
            text = clean(gzip.open(f, "rt", errors="replace").read())
            if len(text) > 200 and total < limit:
                out.write(text + "\n\n")
                total += len(text) + 2
    print(f"{path}: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1])
