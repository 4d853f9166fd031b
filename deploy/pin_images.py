"""Point deploy/kuberay/rayservice.yaml at image digests, or check that it does.

Every pod must run the same build, and a tag can be moved after the fact; a digest cannot. So the
manifest names images only as `<repository>@sha256:<64 hex>`; the committed file carries an all-zero
placeholder digest, which `--check --release` refuses.

    docker push registry.example.com/genserve-cpu:$SHA      # prints the digest
    .venv/bin/python deploy/pin_images.py --cpu registry.example.com/genserve-cpu@sha256:<digest> \\
                                          --gpu registry.example.com/genserve-gpu@sha256:<digest>
    .venv/bin/python deploy/pin_images.py --check --release  # before kubectl apply
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "kuberay" / "rayservice.yaml"
DIGEST_REF = re.compile(r"^[a-z0-9.\-/:]+@sha256:[0-9a-f]{64}$")
PLACEHOLDER = "sha256:" + "0" * 64
IMAGE_LINE = re.compile(r"^(\s*image:\s*)(\S+)\s*$", re.M)


def images(text: str) -> list[str]:
    return [m.group(2) for m in IMAGE_LINE.finditer(text)]


def problems(text: str, release: bool) -> list[str]:
    out = []
    for ref in dict.fromkeys(images(text)):
        if not DIGEST_REF.match(ref):
            out.append(f"{ref}: not <repository>@sha256:<digest>")
        elif release and ref.endswith(PLACEHOLDER):
            out.append(f"{ref}: the placeholder digest; run deploy/pin_images.py --cpu ... --gpu ...")
    if not images(text):
        out.append("no image lines")
    return out


def pin(text: str, flavour: str, ref: str) -> str:
    if not DIGEST_REF.match(ref):
        raise SystemExit(f"--{flavour} {ref}: give <repository>@sha256:<64 hex digest>")

    def swap(match: re.Match) -> str:
        current = match.group(2)
        repository = current.split("@", 1)[0]
        return match.group(1) + ref if repository.endswith(f"-{flavour}") else match.group(0)

    return IMAGE_LINE.sub(swap, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", help="the CPU image (head, ingress) as <repository>@sha256:<digest>")
    parser.add_argument("--gpu", help="the GPU image (GPU and training groups) as <repository>@sha256:<digest>")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every image is pinned by digest")
    parser.add_argument("--release", action="store_true", help="with --check: refuse the placeholder digest too")
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    text = args.manifest.read_text()
    if args.cpu or args.gpu:
        for flavour in ("cpu", "gpu"):
            if getattr(args, flavour):
                text = pin(text, flavour, getattr(args, flavour))
        args.manifest.write_text(text)
        print(f"{args.manifest}: {len(set(images(text)))} distinct images")
    if args.check:
        found = problems(text, args.release)
        for line in found:
            print(line, file=sys.stderr)
        if found:
            return 1
        print(f"{args.manifest.name}: every image pinned by digest")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
