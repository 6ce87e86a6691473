"""Build `.dvc/offline_plots.html`: DVC's plots page with Vega inlined, so `dvc plots show` works offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN; with no network it stays blank. This
writes an HTML template (DVC's `plots.html_template`, set in `.dvc/config`) that carries the three
minified bundles inline, at the exact versions DVC's renderer asks the CDN for, so the specs DVC writes
run against the library versions they were made for. Run it again after upgrading DVC:

    python tools/offline_plots.py            # needs npm and the npm registry, once

The bundles come from the npm registry through `npm pack`, which checks each tarball's integrity hash.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TEMPLATE = PROJECT / ".dvc" / "offline_plots.html"
# npm package -> its minified browser bundle inside the tarball (what the CDN URL resolves to)
BUNDLES = {
    "vega": "package/build/vega.min.js",
    "vega-lite": "package/build/vega-lite.min.js",
    "vega-embed": "package/build/vega-embed.min.js",
}
# DVC fills {refresh_tag} and {plot_divs}; {scripts} is left out on purpose: it is where DVC would put
# the CDN <script> tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def dvc_versions() -> dict[str, str]:
    """The vega library versions DVC's renderer loads from the CDN: {"vega": "5.20.2", ...}."""
    from dvc_render.vega import VegaRenderer

    found = dict(re.findall(r"/npm/([a-z-]+)@([0-9][^\"/]*)", VegaRenderer.SCRIPTS))
    missing = set(BUNDLES) - set(found)
    if missing:
        raise SystemExit(f"dvc_render's VegaRenderer.SCRIPTS no longer names {sorted(missing)}; update BUNDLES")
    return {name: found[name] for name in BUNDLES}


def script_tag(package: str, version: str, tarball: Path) -> str:
    with tarfile.open(tarball) as archive:
        code = archive.extractfile(BUNDLES[package]).read().decode("utf-8")
        licence = archive.extractfile("package/LICENSE").read().decode("utf-8").strip()
    # The source map is not shipped; without this line a browser's dev tools would go looking for it.
    code = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", code)
    for marker in ("</script", "{refresh_tag}", "{plot_divs}", "{scripts}"):
        if marker in code:  # would end the inline script early, or be filled in by DVC
            raise SystemExit(f"{package}@{version}: the bundle contains {marker!r}; it cannot be inlined")
    # BSD-3-Clause asks that the copyright notice travel with the code.
    return f"    <!-- {package}@{version} (npm), {BUNDLES[package]}\n{licence}\n    -->\n    <script>{code}</script>"


def build(out: Path) -> None:
    versions = dvc_versions()
    with tempfile.TemporaryDirectory() as folder:
        specs = [f"{name}@{version}" for name, version in versions.items()]
        packed = subprocess.run(
            ["npm", "pack", "--silent", "--pack-destination", folder, *specs],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        tags = [
            script_tag(name, versions[name], Path(folder) / tgz) for name, tgz in zip(versions, packed, strict=True)
        ]
    out.write_text(PAGE.format(scripts="\n".join(tags)), encoding="utf-8")
    print(f"{out}: {', '.join(specs)} ({out.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TEMPLATE, help=f"where to write it (default: {TEMPLATE})")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
